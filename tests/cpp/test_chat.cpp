// Block chat encoder (csrc/chat.h) without an encoder: plan() lays out the pieces and rejects what the Python
// path rejects; header_counts() and assemble() run on made-up token ids (one token per byte of each text).
#include <cstring>
#include <string>
#include <vector>

#include "chat.h"
#include "check.h"
#include "utf8.h"

using namespace mlmix;

namespace {

struct Columns {
  std::vector<uint8_t> kind;
  std::vector<int64_t> turn_offsets{0};
  std::string roles, contents;
  std::vector<int64_t> role_offsets{0}, content_offsets{0};

  void chat(const std::vector<std::pair<std::string, std::string>>& turns) {
    kind.push_back(1);
    for (const auto& [r, c] : turns) add(r, c);
    turn_offsets.push_back(static_cast<int64_t>(role_offsets.size()) - 1);
  }
  void text(const std::string& t) {
    kind.push_back(0);
    add("", t);
    turn_offsets.push_back(static_cast<int64_t>(role_offsets.size()) - 1);
  }
  void add(const std::string& r, const std::string& c) {
    roles += r;
    contents += c;
    role_offsets.push_back(static_cast<int64_t>(roles.size()));
    content_offsets.push_back(static_cast<int64_t>(contents.size()));
  }
  chat::Block block() const {
    chat::Block b;
    b.n = static_cast<int64_t>(kind.size());
    b.kind = kind.data();
    b.turn_offsets = turn_offsets.data();
    b.n_turns = static_cast<int64_t>(role_offsets.size()) - 1;
    b.role_values = reinterpret_cast<const uint8_t*>(roles.data());
    b.role_bytes = static_cast<int64_t>(roles.size());
    b.role_offsets = role_offsets.data();
    b.content_values = reinterpret_cast<const uint8_t*>(contents.data());
    b.content_bytes = static_cast<int64_t>(contents.size());
    b.content_offsets = content_offsets.data();
    return b;
  }
};

chat::Spec chatml() {
  chat::Spec s;
  s.style = chat::Style::kChatML;
  s.fixed[chat::kImStart] = {1000};
  s.fixed[chat::kImEnd] = {1001};
  s.fixed[chat::kNewline] = {10};
  s.fixed[chat::kEos] = {1002};
  s.header = "assistant\n";
  for (char c : s.header) s.header_ids.push_back(static_cast<uint8_t>(c));
  return s;
}

// one token per byte: the ids are the bytes
bpe::EncodeResult bytes_as_tokens(const chat::Plan& p) {
  bpe::EncodeResult r;
  r.offsets.push_back(0);
  for (int64_t t = 0; t < p.n_texts(); ++t) {
    for (int64_t i = p.text_offsets[t]; i < p.text_offsets[t + 1]; ++i) r.values.push_back(static_cast<uint8_t>(p.arena[i]));
    r.offsets.push_back(static_cast<int64_t>(r.values.size()));
  }
  return r;
}

std::string text_at(const chat::Plan& p, int64_t t) {
  return p.arena.substr(static_cast<size_t>(p.text_offsets[t]), static_cast<size_t>(p.text_offsets[t + 1] - p.text_offsets[t]));
}

// 256 one-byte tokens (id = byte), no merges: encode() on it checks the texts' UTF-8 as the real one does
bpe::Config byte_config() {
  bpe::Config c;
  c.pre_tokenizer = bpe::PreTokenizer::kQwen2;
  c.vocab_offsets.push_back(0);
  for (int b = 0; b < 256; ++b) {
    c.vocab_bytes.push_back(static_cast<char>(b));
    c.vocab_offsets.push_back(static_cast<int64_t>(c.vocab_bytes.size()));
    c.vocab_ids.push_back(static_cast<uint32_t>(b));
  }
  return c;
}

}  // namespace

int main() {
  // UTF-8 as Python's strict decoder has it
  auto valid = [](const char* s) { return utf8::valid(reinterpret_cast<const uint8_t*>(s), std::strlen(s)); };
  EXPECT(valid("plain ascii text, longer than eight bytes"));
  EXPECT(valid("\xc3\xa9\xe4\xb8\xad\xf0\x9f\x99\x82"));
  EXPECT(!valid("\xed\xa0\x80"));      // a surrogate
  EXPECT(!valid("\xc0\xaf"));          // overlong
  EXPECT(!valid("\xe0\x80\xaf"));      // overlong
  EXPECT(!valid("\xf4\x90\x80\x80"));  // above U+10FFFF
  EXPECT(!valid("abcdefgh\xc3"));      // cut short

  // ChatML: pieces, masks, and the header straddle counted from byte lengths
  {
    Columns c;
    c.chat({{"user", "hi"}, {"assistant", "yo"}});
    c.chat({{"system", "s"}, {"user", "q"}, {"assistant", "\n\nstraddle"}});
    c.text("doc");
    chat::Spec spec = chatml();
    chat::Plan p = chat::plan(c.block(), spec);
    EXPECT(p.reject == chat::Reject::kNone);
    EXPECT(p.n_texts() == 6);
    EXPECT(text_at(p, 1) == "assistant\nyo" && text_at(p, 4) == "assistant\n\n\nstraddle" && text_at(p, 5) == "doc");
    bpe::EncodeResult enc = bytes_as_tokens(p);
    // a token "\n\n\n" straddling the header's end would not match the header's ids: make text 4's tokens so
    enc = bpe::EncodeResult{};
    enc.offsets.push_back(0);
    for (int64_t t = 0; t < p.n_texts(); ++t) {
      const std::string s = text_at(p, t);
      if (t == 4) {
        for (const char* tok : {"assistant", "\n\n\n", "straddle"}) enc.values.push_back(static_cast<uint32_t>(std::strlen(tok)) + 500);
      } else {
        for (char ch : s) enc.values.push_back(static_cast<uint8_t>(ch));
      }
      enc.offsets.push_back(static_cast<int64_t>(enc.values.size()));
    }
    std::vector<uint32_t> token_bytes(600, 1);
    token_bytes[509] = 9;  // "assistant"
    token_bytes[503] = 3;  // "\n\n\n"
    token_bytes[508] = 8;  // "straddle"
    auto heads = chat::header_counts(p, enc, spec, token_bytes.data(), 600, {});
    int64_t split_pieces = 0;
    for (size_t k = 0; k < p.pieces.size(); ++k) {
      if (p.pieces[k].code != chat::kSplit) continue;
      ++split_pieces;
      EXPECT(heads[k] == (p.pieces[k].src == 4 ? 1 : 10));
    }
    EXPECT(split_pieces == 2);
    // without byte lengths, or for a text listed as inexact, the caller is asked (-1)
    auto unknown = chat::header_counts(p, enc, spec, nullptr, 0, {});
    auto inexact = chat::header_counts(p, enc, spec, token_bytes.data(), 600, {4});
    for (size_t k = 0; k < p.pieces.size(); ++k) {
      if (p.pieces[k].src == 4) EXPECT(unknown[k] == -1 && inexact[k] == -1);
    }
    chat::Output out = chat::assemble(p, enc, spec, heads);
    EXPECT(out.offsets.size() == 4);
    // record 0: <im_start> "user\nhi" <im_end> \n <im_start> "assistant\nyo" <im_end> \n
    std::vector<uint8_t> want0 = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
    want0.insert(want0.end(), 11, 0);  // <im_start> + the header
    want0.insert(want0.end(), {1, 1, 1, 0});
    std::vector<uint8_t> got0(out.mask.begin() + out.offsets[0], out.mask.begin() + out.offsets[1]);
    EXPECT(got0 == want0);
    // record 2: text + EOS, all trained
    std::vector<uint32_t> doc(out.tokens.begin() + out.offsets[2], out.tokens.end());
    EXPECT((doc == std::vector<uint32_t>{'d', 'o', 'c', 1002}));
    for (int64_t i = out.offsets[2]; i < out.offsets[3]; ++i) EXPECT(out.mask[i] == 1);
  }

  // Llama-3: BOS once, roles as fixed pieces, content stripped as Python's str.strip() does
  {
    Columns c;
    c.chat({{"user", "\xc2\xa0 a b\xe3\x80\x80\n"}, {"assistant", "\x1c x \xe2\x80\xa8"}});
    chat::Spec spec;
    spec.style = chat::Style::kLlama3;
    spec.has_bos = true;
    for (int s = chat::kBos; s <= chat::kRoleAssistant; ++s) spec.fixed[s] = {static_cast<uint32_t>(2000 + s)};
    spec.header = "\n\n";
    spec.header_ids = {'\n', '\n'};
    chat::Plan p = chat::plan(c.block(), spec);
    EXPECT(p.reject == chat::Reject::kNone);
    EXPECT(text_at(p, 0) == "\n\na b" && text_at(p, 1) == "\n\nx");
    EXPECT(p.record_pieces[1] == 11);  // bos + 5 + 5
  }

  // what the Python path rejects, the plan rejects (or, for a ChatML text's UTF-8, encode() as it reads it)
  const bpe::Encoder byte_encoder(byte_config());
  auto rejects = [&](const Columns& c, chat::TrainOn on = chat::TrainOn::kAllAssistant) {
    chat::Spec spec = chatml();
    spec.train_on = on;
    chat::Plan p = chat::plan(c.block(), spec);
    if (p.reject == chat::Reject::kNone) chat::encode(byte_encoder, p, spec);
    return p.reject;
  };
  {
    Columns c;
    c.text("");
    EXPECT(rejects(c) == chat::Reject::kEmptyText);
  }
  {
    Columns c;
    c.chat({});
    EXPECT(rejects(c) == chat::Reject::kEmptyConversation);
  }
  {
    Columns c;
    c.chat({{"user", "q"}});
    EXPECT(rejects(c) == chat::Reject::kNoAssistant);
    EXPECT(rejects(c, chat::TrainOn::kAll) == chat::Reject::kNone);
  }
  {
    Columns c;
    c.chat({{"tool", "q"}, {"assistant", "a"}});
    EXPECT(rejects(c) == chat::Reject::kUnknownRole);
  }
  for (const char* bad : {"\xff", "h\xc3\xa9llo\xff", "\x80", "ab\xe4\xb8", "\xc0\xaf", "\xe0\x80\xaf", "\xed\xa0\x80",
                          "\xf4\x90\x80\x80", "\xf8\x88\x80\x80\x80", "\xe4\xb8\xad\xe4\xb8", "\xf0\x9f\x99"}) {
    for (int where = 0; where < 2; ++where) {
      Columns c;
      c.chat({{"user", where == 0 ? bad : "q"}, {"assistant", where == 1 ? bad : "a"}});
      EXPECT(rejects(c) == chat::Reject::kInvalidUtf8);
      Columns t;
      t.text(bad);
      EXPECT(rejects(t) == chat::Reject::kInvalidUtf8);
      // Llama-3 strips its texts first, so its plan checks them
      chat::Spec spec = chatml();
      spec.style = chat::Style::kLlama3;
      chat::Plan p = chat::plan(c.block(), spec);
      EXPECT(p.reject == chat::Reject::kInvalidUtf8);
    }
  }
  {
    Columns c;
    c.chat({{"user", "\xc3\xa9\xe4\xb8\xad\xf0\x9f\x99\x82 \xc2\xa0"}, {"assistant", "\xd0\xb0\xd0\xb1"}});
    EXPECT(rejects(c) == chat::Reject::kNone);
  }
  {
    Columns c;  // a text record's role is never used, but to_records decodes it: the plan checks every role
    c.kind.push_back(0);
    c.add("\xff", "ok");
    c.turn_offsets.push_back(1);
    EXPECT(rejects(c) == chat::Reject::kInvalidUtf8);
  }
  {
    Columns c;
    c.chat({{"user", "q"}, {"assistant", "a"}});
    c.turn_offsets[1] = 5;  // past the turns
    EXPECT(rejects(c) == chat::Reject::kBadShape);
  }

  if (mlmix_test::failures) std::fprintf(stderr, "%d failure(s)\n", mlmix_test::failures);
  return mlmix_test::failures ? 1 : 0;
}
