// libFuzzer target: the native byte-level BPE encoder (csrc/bpe.h) over every pre-tokenizer, on
// arbitrary documents in each code-unit width (UTF-8 bytes with invalid sequences, Latin-1, UCS-2 with
// lone surrogates, UCS-4 with out-of-range code points), added tokens split or not, several threads.
// Checks beyond "no memory error": ids are in the vocabulary, a batch gives the same ids as each
// document alone, the thread count changes nothing, and without added tokens the ids' bytes are the
// document's UTF-8 bytes (byte-level BPE loses nothing).
#include <fuzzer/FuzzedDataProvider.h>

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "bpe.h"

using namespace mlmix::bpe;

namespace {

// 256 byte tokens (id = byte) and merges of frequent ASCII pairs, then merges of those merges, so that
// merge chains of several levels happen; two added tokens, one special.
struct Model {
  Config config;
  std::vector<std::string> token_bytes;
  std::unique_ptr<Encoder> encoder[4];
  Model() {
    std::vector<std::string> merged;
    auto add = [&](const std::string& bytes) {
      config.vocab_bytes += bytes;
      config.vocab_offsets.push_back(static_cast<int64_t>(config.vocab_bytes.size()));
      config.vocab_ids.push_back(static_cast<uint32_t>(token_bytes.size()));
      token_bytes.push_back(bytes);
    };
    config.vocab_offsets.push_back(0);
    for (int b = 0; b < 256; ++b) add(std::string(1, static_cast<char>(b)));
    const std::string letters = " etaoinshrdlu";
    for (char a : letters)
      for (char b : letters) {
        const std::string ab{a, b};
        add(ab);
        config.merges_left.push_back(static_cast<uint8_t>(a));
        config.merges_right.push_back(static_cast<uint8_t>(b));
        merged.push_back(ab);
      }
    for (size_t i = 0; i + 1 < merged.size(); i += 7) {  // pairs of pairs
      const uint32_t l = 256 + static_cast<uint32_t>(i), r = 256 + static_cast<uint32_t>(i + 1);
      add(merged[i] + merged[i + 1]);
      config.merges_left.push_back(l);
      config.merges_right.push_back(r);
    }
    AddedToken special;
    special.content = U"<|end|>";
    special.id = static_cast<uint32_t>(token_bytes.size());
    special.special = true;
    config.added_tokens.push_back(special);
    AddedToken plain;
    plain.content = U"é\u0301";
    plain.id = special.id + 1;
    plain.normalized = true;
    config.added_tokens.push_back(plain);
    for (int p = 0; p < 4; ++p) {
      Config c = config;
      c.pre_tokenizer = static_cast<PreTokenizer>(p);
      c.add_prefix_space = p == 0;
      c.nfc = p == 3;
      encoder[p] = std::make_unique<Encoder>(c);
    }
  }
};

void append_utf8(std::string& s, char32_t c) {
  if (c < 0x80) {
    s += static_cast<char>(c);
  } else if (c < 0x800) {
    s += static_cast<char>(0xC0 | (c >> 6));
    s += static_cast<char>(0x80 | (c & 0x3F));
  } else if (c < 0x10000) {
    s += static_cast<char>(0xE0 | (c >> 12));
    s += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    s += static_cast<char>(0x80 | (c & 0x3F));
  } else {
    s += static_cast<char>(0xF0 | (c >> 18));
    s += static_cast<char>(0x80 | ((c >> 12) & 0x3F));
    s += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    s += static_cast<char>(0x80 | (c & 0x3F));
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static Model model;
  FuzzedDataProvider in(data, size);
  const int p = in.ConsumeIntegralInRange<int>(0, 3);
  const Encoder& enc = *model.encoder[p];
  const int width_choice = in.ConsumeIntegralInRange<int>(0, 3);
  const int width = width_choice == 3 ? 4 : width_choice;  // 0 (UTF-8), 1, 2, 4
  EncodeOptions opt;
  opt.add_special_tokens = in.ConsumeBool();
  opt.split_special_tokens = in.ConsumeBool();
  const size_t ndocs = in.ConsumeIntegralInRange<size_t>(1, 4);
  // the documents' code units, kept alive for the views
  std::vector<std::vector<uint8_t>> u8(ndocs);
  std::vector<std::vector<uint16_t>> u16(ndocs);
  std::vector<std::vector<uint32_t>> u32(ndocs);
  std::vector<TextView> docs(ndocs);
  for (size_t d = 0; d < ndocs; ++d) {
    const std::string raw = in.ConsumeRandomLengthString(64);
    if (width <= 1) {
      u8[d].assign(raw.begin(), raw.end());
      docs[d] = TextView{u8[d].data(), static_cast<int64_t>(u8[d].size()), width};
    } else if (width == 2) {
      for (size_t i = 0; i + 1 < raw.size(); i += 2)
        u16[d].push_back(static_cast<uint16_t>(static_cast<uint8_t>(raw[i]) | static_cast<uint8_t>(raw[i + 1]) << 8));
      docs[d] = TextView{u16[d].data(), static_cast<int64_t>(u16[d].size()), 2};
    } else {
      for (size_t i = 0; i + 2 < raw.size(); i += 3)  // up to 0x10FFFF and beyond, surrogates included
        u32[d].push_back(static_cast<uint32_t>(static_cast<uint8_t>(raw[i])) |
                         static_cast<uint32_t>(static_cast<uint8_t>(raw[i + 1])) << 8 |
                         static_cast<uint32_t>(static_cast<uint8_t>(raw[i + 2]) & 0x1F) << 16);
      docs[d] = TextView{u32[d].data(), static_cast<int64_t>(u32[d].size()), 4};
    }
  }
  EncodeResult all;
  try {
    opt.num_threads = 1;
    all = enc.encode_batch(docs, opt);
  } catch (const std::invalid_argument&) {
    return 0;  // invalid UTF-8 or a lone surrogate: refused, as it must be
  }
  if (all.offsets.size() != ndocs + 1 || all.offsets.back() != static_cast<int64_t>(all.values.size())) std::abort();
  const size_t vocab = model.token_bytes.size() + 2;
  for (uint32_t id : all.values)
    if (id >= vocab) std::abort();
  // each call allocates the encoder's per-thread piece cache (1.2 MB): the cross-checks that cost more
  // calls run for one input in eight, to keep executions fast
  const bool thorough = in.ConsumeIntegralInRange<int>(0, 7) == 0;
  opt.num_threads = 3;
  if (thorough && enc.encode_batch(docs, opt).values != all.values) std::abort();
  opt.num_threads = 1;
  for (size_t d = 0; d < ndocs && thorough; ++d) {
    const EncodeResult one = enc.encode_batch(std::vector<TextView>{docs[d]}, opt);
    if (!std::equal(one.values.begin(), one.values.end(), all.values.begin() + all.offsets[d],
                    all.values.begin() + all.offsets[d + 1]) ||
        static_cast<int64_t>(one.values.size()) != all.offsets[d + 1] - all.offsets[d])
      std::abort();
  }
  // lossless: with no added token in play, no NFC and no prefix space, the ids spell the UTF-8 text
  if (p == 1 || p == 2) {
    for (size_t d = 0; d < ndocs; ++d) {
      std::string text;
      bool has_added = false;
      for (int64_t i = 0; i < docs[d].len; ++i) {
        char32_t c = width <= 1 ? u8[d][i] : width == 2 ? u16[d][i] : u32[d][i];
        if (width == 0) {
          text.assign(reinterpret_cast<const char*>(u8[d].data()), u8[d].size());
          break;
        }
        append_utf8(text, c);
      }
      has_added = text.find("<|end|>") != std::string::npos || text.find("\xC3\xA9") != std::string::npos ||
                  text.find("e\xCC\x81") != std::string::npos;
      if (has_added) continue;
      std::string spelled;
      for (int64_t k = all.offsets[d]; k < all.offsets[d + 1]; ++k) spelled += model.token_bytes[all.values[k]];
      if (spelled != text) std::abort();
    }
  }
  return 0;
}
