// C++ checks of the BPE core without Python: UTF-8 input (the path Python strings never take), merges by
// rank, added tokens, and errors on bad input. Built with -DMLMIX_BUILD_TESTS=ON (.ci/dev-build does).
#include <cstdio>
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
  return enc.encode_batch(docs, opt).values;
}

int main() {
  Encoder enc(tiny_config());
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
