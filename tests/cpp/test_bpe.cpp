// C++ checks of the BPE core without Python: UTF-8 input (the path Python strings never take), merges by
// rank, added tokens, and errors on bad input. Built with -DMLMIX_BUILD_TESTS=ON (.ci/dev-build does).
#include <cstdio>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "bpe.h"
#include "check.h"

using mlmix::bpe::Config;
using mlmix::bpe::EncodeOptions;
using mlmix::bpe::Encoder;
using mlmix::bpe::TextView;

using mlmix_test::failures;

// 256 byte tokens (id = byte) plus "ab" (256), "abc" (257), "bc" (258), with merges ranked b+c < a+b < ab+c.
static Config tiny_config() {
  Config c;
  c.pre_tokenizer = mlmix::bpe::PreTokenizer::kQwen2;
  c.vocab_offsets.push_back(0);
  for (int b = 0; b < 256; ++b) {
    c.vocab_bytes.push_back(static_cast<char>(b));
    c.vocab_offsets.push_back(static_cast<int64_t>(c.vocab_bytes.size()));
    c.vocab_ids.push_back(static_cast<uint32_t>(b));
  }
  for (const char* t : {"ab", "abc", "bc"}) {
    c.vocab_bytes += t;
    c.vocab_offsets.push_back(static_cast<int64_t>(c.vocab_bytes.size()));
    c.vocab_ids.push_back(static_cast<uint32_t>(c.vocab_ids.size()));
  }
  c.merges_left = {'b', 'a'};
  c.merges_right = {'c', 'b'};
  mlmix::bpe::AddedToken special;
  special.content = U"<s>";
  special.id = 259;
  special.special = true;
  c.added_tokens.push_back(special);
  return c;
}

static std::vector<uint32_t> encode_utf8(const Encoder& enc, const std::string& s, EncodeOptions opt = {}) {
  std::vector<TextView> docs{TextView{s.data(), static_cast<int64_t>(s.size()), 0}};
  const auto values = enc.encode_batch(docs, opt).values;
  return std::vector<uint32_t>(values.begin(), values.end());
}

// The code points of valid UTF-8 (the width-4 view of the same text).
static std::u32string decode(const std::string& s) {
  std::u32string out;
  for (size_t i = 0; i < s.size();) {
    const auto b = static_cast<uint8_t>(s[i]);
    const int len = b < 0x80 ? 1 : b < 0xE0 ? 2 : b < 0xF0 ? 3 : 4;
    char32_t c = len == 1 ? b : len == 2 ? (b & 0x1F) : len == 3 ? (b & 0x0F) : (b & 0x07);
    for (int k = 1; k < len; ++k) c = (c << 6) | (static_cast<uint8_t>(s[i + k]) & 0x3F);
    out.push_back(c);
    i += static_cast<size_t>(len);
  }
  return out;
}

// UTF-8 documents are encoded from their own bytes (each piece read in place, copied only near the end of the
// document, where the piece cache's 16-byte reads would pass it): the ids must be those of the same text given
// as code points, for every document length and wherever the pieces and added tokens fall. Each document sits
// in an allocation of exactly its size, so that a read past it shows under AddressSanitizer.
static void utf8_in_place_matches_code_points(const Encoder& enc) {
  const char* parts[] = {"a", "b", "c", "ab", "abc", " ", "  ", "\n", "7", "<s>", "x", "\xC3\xA9", "\xE4\xB8\xAD",
                         "\xF0\x9F\x98\x80", "'s", ".", "\xD0\xB0\xD0\xB1", "bcbcbcbcbcbcbcbcbcbc"};
  std::mt19937 rng(7);
  std::vector<std::string> texts;
  for (int d = 0; d < 400; ++d) {
    std::string t;
    const int n = static_cast<int>(rng() % 24);
    for (int k = 0; k < n; ++k) t += parts[rng() % (sizeof(parts) / sizeof(parts[0]))];
    texts.push_back(t);
  }
  std::vector<std::unique_ptr<uint8_t[]>> held;
  std::vector<std::u32string> wide;
  std::vector<TextView> as_utf8, as_points;
  for (const std::string& t : texts) {
    held.emplace_back(new uint8_t[t.size() + (t.empty() ? 1 : 0)]);
    std::copy(t.begin(), t.end(), held.back().get());
    as_utf8.push_back(TextView{held.back().get(), static_cast<int64_t>(t.size()), 0});
    wide.push_back(decode(t));
  }
  for (const auto& w : wide) as_points.push_back(TextView{w.data(), static_cast<int64_t>(w.size()), 4});
  for (int threads : {1, 3}) {
    for (bool split : {false, true}) {
      EncodeOptions opt;
      opt.num_threads = threads;
      opt.split_special_tokens = split;
      const auto a = enc.encode_batch(as_utf8, opt), b = enc.encode_batch(as_points, opt);
      EXPECT(a.values == b.values && a.offsets == b.offsets && a.first_invalid == -1);
    }
  }
  // report_invalid: the first document that is not valid UTF-8 is named, nothing thrown
  std::string bad = "ab\xC0\xAF";
  as_utf8[5] = TextView{bad.data(), static_cast<int64_t>(bad.size()), 0};
  as_utf8[300] = as_utf8[5];
  EncodeOptions report;
  report.report_invalid = true;
  report.num_threads = 3;
  EXPECT(enc.encode_batch(as_utf8, report).first_invalid == 5);
}

int main() {
  Encoder enc(tiny_config());
  utf8_in_place_matches_code_points(enc);
  // "abc": b+c (rank 0) wins over a+b (rank 1), leaving a + bc (no merge between them).
  EXPECT((encode_utf8(enc, "abc") == std::vector<uint32_t>{'a', 258}));
  EXPECT((encode_utf8(enc, "ab") == std::vector<uint32_t>{256}));
  // The added token is cut out before pre-tokenization; é is two UTF-8 bytes.
  EXPECT((encode_utf8(enc, "x<s>\xC3\xA9") == std::vector<uint32_t>{'x', 259, 0xC3, 0xA9}));
  EncodeOptions as_text;
  as_text.split_special_tokens = true;
  EXPECT((encode_utf8(enc, "<s>", as_text) == std::vector<uint32_t>{'<', 's', '>'}));
  // Invalid UTF-8 (a lone continuation byte, an encoded surrogate, an overlong form) is an error.
  for (const char* bad : {"a\x80", "\xED\xA0\x80", "\xC0\xAF"}) {
    bool threw = false;
    try {
      encode_utf8(enc, bad);
    } catch (const std::invalid_argument&) {
      threw = true;
    }
    EXPECT(threw);
  }
  // A vocabulary without all 256 bytes is refused with a message, not a crash.
  Config missing = tiny_config();
  missing.vocab_bytes.erase(0, 1);
  missing.vocab_offsets.erase(missing.vocab_offsets.begin() + 1);
  for (auto& o : missing.vocab_offsets) o = o > 0 ? o - 1 : 0;
  missing.vocab_ids.erase(missing.vocab_ids.begin());
  bool threw = false;
  try {
    Encoder bad(missing);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  EXPECT(threw);
  if (failures == 0) std::printf("test_bpe: ok\n");
  return failures == 0 ? 0 : 1;
}
