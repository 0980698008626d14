#include "chat.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <exception>
#include <thread>
#include <type_traits>

#include "common.h"
#include "parallel.h"
#include "utf8.h"

namespace mlmix::chat {
namespace {

// Runs f(lo, hi) over [0, n) on `threads` threads, in ranges of at least 1024 items (parallel.h: the
// error of the lowest range is the one rethrown).
template <typename F>
void parallel_ranges(int64_t n, int threads, F&& f) {
  const int64_t t = std::max(1, threads);
  parallel_chunks(n, threads, std::max<int64_t>(1024, (n + t - 1) / t), f);
}

// Python's str.isspace() (Unicode White_Space plus U+001C..U+001F), which str.strip() removes.
bool py_space(uint32_t c) {
  if (c <= 0x20) return c == 0x20 || (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x1F);
  if (c < 0x85) return false;
  return c == 0x85 || c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 ||
         c == 0x202F || c == 0x205F || c == 0x3000;
}

// The code point starting at p (valid UTF-8 assumed) and its length.
uint32_t decode_at(const uint8_t* p, int* len) {
  const uint8_t b = p[0];
  if (b < 0x80) {
    *len = 1;
    return b;
  }
  if (b < 0xE0) {
    *len = 2;
    return (uint32_t(b & 0x1F) << 6) | (p[1] & 0x3F);
  }
  if (b < 0xF0) {
    *len = 3;
    return (uint32_t(b & 0x0F) << 12) | (uint32_t(p[1] & 0x3F) << 6) | (p[2] & 0x3F);
  }
  *len = 4;
  return (uint32_t(b & 0x07) << 18) | (uint32_t(p[1] & 0x3F) << 12) | (uint32_t(p[2] & 0x3F) << 6) | (p[3] & 0x3F);
}

// [lo, hi) of p[0:len] without leading and trailing Python whitespace (str.strip()).
void py_strip(const uint8_t* p, int64_t len, int64_t* lo, int64_t* hi) {
  int64_t a = 0, b = len;
  while (a < b) {
    int l = 0;
    const uint32_t c = decode_at(p + a, &l);
    if (!py_space(c)) break;
    a += l;
  }
  while (b > a) {
    int64_t s = b - 1;
    while (s > a && (p[s] & 0xC0) == 0x80) --s;
    int l = 0;
    const uint32_t c = decode_at(p + s, &l);
    if (!py_space(c)) break;
    b = s;
  }
  *lo = a;
  *hi = b;
}

enum Role : int { kSystem = 0, kUser = 1, kAssistant = 2, kUnknown = 3 };

Role role_of(const uint8_t* p, int64_t len) {
  auto is = [&](const char* s, int64_t n) { return len == n && std::memcmp(p, s, static_cast<size_t>(n)) == 0; };
  if (is("user", 4)) return kUser;
  if (is("assistant", 9)) return kAssistant;
  if (is("system", 6)) return kSystem;
  return kUnknown;
}

const char* kRoleText[3] = {"system", "user", "assistant"};
const int64_t kRoleLen[3] = {6, 4, 9};

bool offsets_ok(const int64_t* off, int64_t count, int64_t n_values) {
  if (off[0] < 0) return false;
  for (int64_t i = 0; i < count; ++i) {
    if (off[i + 1] < off[i]) return false;
  }
  return off[count] <= n_values;
}

struct Sizes {
  int64_t pieces = 0, texts = 0, bytes = 0;
};

}  // namespace

const char* reject_name(Reject r) {
  switch (r) {
    case Reject::kNone: return "none";
    case Reject::kBadShape: return "bad_shape";
    case Reject::kInvalidUtf8: return "invalid_utf8";
    case Reject::kEmptyText: return "empty_text";
    case Reject::kEmptyConversation: return "empty_conversation";
    case Reject::kUnknownRole: return "unknown_role";
    case Reject::kNoAssistant: return "no_assistant_turn";
  }
  return "?";
}

int64_t first_invalid_utf8(const uint8_t* values, int64_t n_values, const int64_t* offsets, int64_t n_strings) {
  if (!offsets_ok(offsets, n_strings, n_values)) return -2;
  for (int64_t i = 0; i < n_strings; ++i) {
    if (!utf8::valid(values + offsets[i], static_cast<size_t>(offsets[i + 1] - offsets[i]))) return i;
  }
  return -1;
}

Plan plan(const Block& b, const Spec& spec) {
  Plan out;
  const int threads = resolve_threads(spec.num_threads);
  auto reject = [&](Reject r, int64_t rec) {
    out.reject = r;
    out.reject_record = rec;
    return std::move(out);  // returned at once: `out` is not used again
  };
  // shapes: every offset in order and in range
  if (b.n < 0 || b.n_turns < 0 || !offsets_ok(b.turn_offsets, b.n, b.n_turns) ||
      !offsets_ok(b.role_offsets, b.n_turns, b.role_bytes) || !offsets_ok(b.content_offsets, b.n_turns, b.content_bytes)) {
    return reject(Reject::kBadShape, -1);
  }
  const bool chatml = spec.style == Style::kChatML;
  // every role and content decodes (to_records() decodes the whole columns, owned by a record or not). A
  // ChatML text holds every byte of its content, so the contents of the turns that records own are checked
  // by encode() as it reads them (one pass instead of two). Llama-3's strips them first, so they are checked
  // here, as are the contents of turns no record owns (before turn_offsets[0] or from turn_offsets[n] on),
  // which encode() never reads.
  {
    const int64_t owned_lo = b.turn_offsets[0], owned_hi = b.turn_offsets[b.n];
    std::atomic<int64_t> bad{b.n_turns};
    parallel_ranges(b.n_turns, threads, [&](int64_t lo, int64_t hi) {
      for (int64_t t = lo; t < hi && t < bad.load(std::memory_order_relaxed); ++t) {
        const bool check_content = !chatml || t < owned_lo || t >= owned_hi;
        if (!utf8::valid(b.role_values + b.role_offsets[t], static_cast<size_t>(b.role_offsets[t + 1] - b.role_offsets[t])) ||
            (check_content && !utf8::valid(b.content_values + b.content_offsets[t],
                                           static_cast<size_t>(b.content_offsets[t + 1] - b.content_offsets[t])))) {
          int64_t cur = bad.load();
          while (t < cur && !bad.compare_exchange_weak(cur, t)) {
          }
          break;
        }
      }
    });
    if (bad.load() < b.n_turns) return reject(Reject::kInvalidUtf8, -1);
  }

  const bool all = spec.train_on == TrainOn::kAll;
  const bool has_eos = !spec.fixed[kEos].empty();
  // text 0 is the default system prompt's piece, shared by every conversation that gets it
  const int64_t shared_texts = chatml && spec.has_default_system ? 1 : 0;
  const int64_t shared_bytes = shared_texts ? 7 + static_cast<int64_t>(spec.default_system.size()) : 0;

  auto role_at = [&](int64_t t) {
    return role_of(b.role_values + b.role_offsets[t], b.role_offsets[t + 1] - b.role_offsets[t]);
  };
  auto content_at = [&](int64_t t, int64_t* len) {
    *len = b.content_offsets[t + 1] - b.content_offsets[t];
    return b.content_values + b.content_offsets[t];
  };

  // pass 1: validate each record and size its pieces
  std::vector<Sizes> sizes(static_cast<size_t>(b.n));
  std::vector<int64_t> first_bad(static_cast<size_t>(threads), -1);
  std::vector<Reject> first_why(static_cast<size_t>(threads), Reject::kNone);
  std::atomic<int> slot{0};
  parallel_ranges(b.n, threads, [&](int64_t lo, int64_t hi) {
    const int me = slot.fetch_add(1);
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t t0 = b.turn_offsets[i], t1 = b.turn_offsets[i + 1];
      Sizes& s = sizes[i];
      Reject why = Reject::kNone;
      if (b.kind[i] == 0) {
        int64_t len = 0;
        if (t1 - t0 != 1) {
          why = Reject::kBadShape;
        } else {
          content_at(t0, &len);
          if (len == 0) why = Reject::kEmptyText;
        }
        s.pieces = 1 + (has_eos ? 1 : 0);
        s.texts = 1;
        s.bytes = len;
      } else if (t1 == t0) {
        why = Reject::kEmptyConversation;
      } else {
        bool assistant = false;
        for (int64_t t = t0; t < t1; ++t) {
          const Role r = role_at(t);
          if (r == kUnknown) {
            why = Reject::kUnknownRole;
            break;
          }
          assistant = assistant || r == kAssistant;
          int64_t len = 0;
          const uint8_t* c = content_at(t, &len);
          if (chatml) {
            s.pieces += 4;
            s.bytes += kRoleLen[r] + 1 + len;
          } else {
            int64_t a = 0, z = 0;
            py_strip(c, len, &a, &z);
            s.pieces += 5 + (t == t0 && spec.has_bos ? 1 : 0);
            s.bytes += 2 + (z - a);
          }
          s.texts += 1;
        }
        if (why == Reject::kNone && !all && !assistant) why = Reject::kNoAssistant;
        if (why == Reject::kNone && chatml && spec.has_default_system && role_at(t0) != kSystem) s.pieces += 4;
      }
      if (why != Reject::kNone) {
        first_bad[me] = i;
        first_why[me] = why;
        break;
      }
    }
  });
  for (int t = 0; t < threads; ++t) {
    if (first_bad[t] >= 0 && (out.reject_record < 0 || first_bad[t] < out.reject_record)) {
      out.reject = first_why[t];
      out.reject_record = first_bad[t];
    }
  }
  if (out.reject != Reject::kNone) return out;

  // pass 2: where each record's pieces, texts and bytes go
  std::vector<int64_t> text_base(static_cast<size_t>(b.n) + 1), byte_base(static_cast<size_t>(b.n) + 1);
  out.record_pieces.assign(static_cast<size_t>(b.n) + 1, 0);
  text_base[0] = shared_texts;
  byte_base[0] = shared_bytes;
  for (int64_t i = 0; i < b.n; ++i) {
    out.record_pieces[i + 1] = out.record_pieces[i] + sizes[i].pieces;
    text_base[i + 1] = text_base[i] + sizes[i].texts;
    byte_base[i + 1] = byte_base[i] + sizes[i].bytes;
  }
  std::vector<Sizes>().swap(sizes);
  reserve_huge(out.pieces, static_cast<size_t>(out.record_pieces[b.n]));
  out.pieces.resize(static_cast<size_t>(out.record_pieces[b.n]));
  out.text_offsets.resize(static_cast<size_t>(text_base[b.n]) + 1);
  out.arena.allocate(static_cast<size_t>(byte_base[b.n]));
  out.text_offsets[0] = 0;
  if (shared_texts) {
    std::memcpy(out.arena.data(), "system\n", 7);
    std::memcpy(out.arena.data() + 7, spec.default_system.data(), spec.default_system.size());
    out.text_offsets[1] = shared_bytes;
  }

  // pass 3: fill
  parallel_ranges(b.n, threads, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      Piece* pc = out.pieces.data() + out.record_pieces[i];
      int64_t text = text_base[i];
      char* dst = out.arena.data() + byte_base[i];
      auto fixed = [&](Slot s, uint8_t code) { *pc++ = Piece{-1 - static_cast<int64_t>(s), code}; };
      auto text_piece = [&](uint8_t code) {
        *pc++ = Piece{text, code};
        ++text;
        out.text_offsets[text] = dst - out.arena.data();
      };
      auto put = [&](const void* p, int64_t len) {
        std::memcpy(dst, p, static_cast<size_t>(len));
        dst += len;
      };
      const int64_t t0 = b.turn_offsets[i], t1 = b.turn_offsets[i + 1];
      if (b.kind[i] == 0) {
        int64_t len = 0;
        const uint8_t* c = content_at(t0, &len);
        put(c, len);
        text_piece(kTrained);
        if (has_eos) fixed(kEos, kTrained);
        continue;
      }
      int64_t last_assistant = -1;
      for (int64_t t = t0; t < t1; ++t) {
        if (role_at(t) == kAssistant) last_assistant = t;
      }
      // trained: 0 no, 1 content + end of turn, 2 everything (train_on="all")
      auto trained = [&](int64_t t, Role r) -> int {
        if (all) return 2;
        if (spec.train_on == TrainOn::kAllAssistant) return r == kAssistant ? 1 : 0;
        return t == last_assistant ? 1 : 0;
      };
      if (chatml) {
        if (spec.has_default_system && role_at(t0) != kSystem) {
          const uint8_t m = all ? kTrained : kUntrained;
          fixed(kImStart, m);
          *pc++ = Piece{0, m};
          fixed(kImEnd, m);
          fixed(kNewline, m);
        }
        for (int64_t t = t0; t < t1; ++t) {
          const Role r = role_at(t);
          const int tr = trained(t, r);
          int64_t len = 0;
          const uint8_t* c = content_at(t, &len);
          put(kRoleText[r], kRoleLen[r]);
          put("\n", 1);
          put(c, len);
          if (tr == 2) {
            fixed(kImStart, kTrained);
            text_piece(kTrained);
            fixed(kImEnd, kTrained);
            fixed(kNewline, kTrained);
          } else {
            fixed(kImStart, kUntrained);
            text_piece(tr ? kSplit : kUntrained);
            fixed(kImEnd, tr ? kTrained : kUntrained);
            fixed(kNewline, tr ? kGlue : kUntrained);
          }
        }
      } else {
        for (int64_t t = t0; t < t1; ++t) {
          const Role r = role_at(t);
          const int tr = trained(t, r);
          const bool all_on = tr == 2;
          if (t == t0 && spec.has_bos) fixed(kBos, all_on ? kTrained : kUntrained);
          const uint8_t head = all_on ? kTrained : kUntrained;
          fixed(kStartHeader, head);
          fixed(static_cast<Slot>(static_cast<int>(kRoleSystem) + static_cast<int>(r)), head);
          fixed(kEndHeader, head);
          int64_t len = 0, a = 0, z = 0;
          const uint8_t* c = content_at(t, &len);
          py_strip(c, len, &a, &z);
          put("\n\n", 2);
          put(c + a, z - a);
          text_piece(all_on ? kTrained : (tr ? kSplit : kUntrained));
          fixed(kEot, tr ? kTrained : kUntrained);
        }
      }
    }
  });
  return out;
}

namespace {

// The text pieces as the encoder reads them: an ASCII text as Latin-1 code units (in place: its bytes are its
// units), any other as UTF-8, which the encoder decodes as it goes and whose pieces it reads in place.
std::vector<TextView> text_views(const Plan& plan, int threads) {
  const int64_t n = plan.n_texts();
  std::vector<TextView> views(static_cast<size_t>(n));
  const auto* bytes = reinterpret_cast<const uint8_t*>(plan.arena.data());
  parallel_ranges(n, threads, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const uint8_t* p = bytes + plan.text_offsets[t];
      const int64_t len = plan.text_offsets[t + 1] - plan.text_offsets[t];
      views[t] = TextView{p, len, utf8::is_ascii(p, static_cast<size_t>(len)) ? 1 : 0};
    }
  });
  return views;
}

}  // namespace

bpe::EncodeResult encode(const bpe::Encoder& encoder, Plan& plan, const Spec& spec) {
  bpe::EncodeOptions options;
  options.add_special_tokens = false;
  options.split_special_tokens = false;
  options.num_threads = spec.num_threads;
  // a text that is not valid UTF-8 (only ChatML's contents are left to this check: plan() checks the rest) is
  // reported, not thrown: the caller falls back to the path that raises Python's own error
  options.report_invalid = true;
  bpe::EncodeResult r = encoder.encode_batch(text_views(plan, resolve_threads(spec.num_threads)), options);
  if (r.first_invalid >= 0) {
    plan.reject = Reject::kInvalidUtf8;
    return {};
  }
  return r;
}

void replace_documents(bpe::EncodeResult& r, const std::vector<int64_t>& which, const uint32_t* values,
                       const int64_t* offsets) {
  if (which.empty()) return;
  const int64_t n = static_cast<int64_t>(r.offsets.size()) - 1;
  FillVector<uint32_t> vals;
  std::vector<int64_t> offs(static_cast<size_t>(n) + 1, 0);
  vals.reserve(r.values.size() + static_cast<size_t>(offsets[which.size()] - offsets[0]));
  size_t k = 0;
  for (int64_t d = 0; d < n; ++d) {
    if (k < which.size() && which[k] == d) {
      vals.insert(vals.end(), values + offsets[k], values + offsets[k + 1]);
      ++k;
    } else {
      vals.insert(vals.end(), r.values.begin() + r.offsets[d], r.values.begin() + r.offsets[d + 1]);
    }
    offs[d + 1] = static_cast<int64_t>(vals.size());
  }
  r.values = std::move(vals);
  r.offsets = std::move(offs);
}

std::vector<int64_t> header_counts(const Plan& plan, const bpe::EncodeResult& enc, const Spec& spec,
                                   const uint32_t* token_bytes, int64_t n_token_bytes,
                                   const std::vector<int64_t>& inexact) {
  const int64_t n_pieces = static_cast<int64_t>(plan.pieces.size());
  std::vector<int64_t> out(static_cast<size_t>(n_pieces), 0);
  const int64_t h = static_cast<int64_t>(spec.header_ids.size());
  const int64_t header_bytes = static_cast<int64_t>(spec.header.size());
  parallel_ranges(n_pieces, resolve_threads(spec.num_threads), [&](int64_t lo, int64_t hi) {
    for (int64_t p = lo; p < hi; ++p) {
      const Piece& pc = plan.pieces[p];
      if (pc.code != kSplit) continue;
      const uint32_t* tok = enc.values.data() + enc.offsets[pc.src];
      const int64_t len = enc.offsets[pc.src + 1] - enc.offsets[pc.src];
      if (len >= h && std::equal(spec.header_ids.begin(), spec.header_ids.end(), tok)) {
        out[p] = h;
        continue;
      }
      if (token_bytes == nullptr || std::binary_search(inexact.begin(), inexact.end(), pc.src)) {
        out[p] = -1;
        continue;
      }
      // a token straddles the header's end: the tokens wholly inside its bytes
      int64_t count = 0, end = 0;
      for (int64_t k = 0; k < len; ++k) {
        if (tok[k] >= n_token_bytes) {
          count = -1;
          break;
        }
        end += token_bytes[tok[k]];
        if (end > header_bytes) break;
        ++count;
      }
      out[p] = count;
    }
  });
  return out;
}

Output assemble(const Plan& plan, const bpe::EncodeResult& enc, const Spec& spec,
                const std::vector<int64_t>& head_counts) {
  const int64_t n = static_cast<int64_t>(plan.record_pieces.size()) - 1;
  const int threads = resolve_threads(spec.num_threads);
  Output out;
  out.offsets.assign(static_cast<size_t>(n) + 1, 0);
  auto piece_len = [&](const Piece& pc) -> int64_t {
    if (pc.src >= 0) return enc.offsets[pc.src + 1] - enc.offsets[pc.src];
    return static_cast<int64_t>(spec.fixed[-1 - pc.src].size());
  };
  parallel_ranges(n, threads, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      int64_t total = 0;
      for (int64_t p = plan.record_pieces[i]; p < plan.record_pieces[i + 1]; ++p) total += piece_len(plan.pieces[p]);
      out.offsets[i + 1] = total;
    }
  });
  for (int64_t i = 0; i < n; ++i) out.offsets[i + 1] += out.offsets[i];
  reserve_huge(out.tokens, static_cast<size_t>(out.offsets[n]));
  reserve_huge(out.mask, static_cast<size_t>(out.offsets[n]));
  out.tokens.resize(static_cast<size_t>(out.offsets[n]));
  out.mask.resize(static_cast<size_t>(out.offsets[n]));
  const bool glue = spec.train_glue != TrainGlue::kNone;
  parallel_ranges(n, threads, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      uint32_t* tok = out.tokens.data() + out.offsets[i];
      uint8_t* msk = out.mask.data() + out.offsets[i];
      for (int64_t p = plan.record_pieces[i]; p < plan.record_pieces[i + 1]; ++p) {
        const Piece& pc = plan.pieces[p];
        const uint32_t* src;
        int64_t len;
        if (pc.src >= 0) {
          src = enc.values.data() + enc.offsets[pc.src];
          len = enc.offsets[pc.src + 1] - enc.offsets[pc.src];
        } else {
          const auto& ids = spec.fixed[-1 - pc.src];
          src = ids.data();
          len = static_cast<int64_t>(ids.size());
        }
        std::copy(src, src + len, tok);
        if (pc.code == kSplit) {
          const int64_t head = std::min<int64_t>(std::max<int64_t>(head_counts[p], 0), len);
          std::memset(msk, 0, static_cast<size_t>(head));
          std::memset(msk + head, 1, static_cast<size_t>(len - head));
        } else {
          const uint8_t m = pc.code == kTrained || (pc.code == kGlue && glue) ? 1 : 0;
          std::memset(msk, m, static_cast<size_t>(len));
        }
        tok += len;
        msk += len;
      }
    }
  });
  return out;
}

}  // namespace mlmix::chat
