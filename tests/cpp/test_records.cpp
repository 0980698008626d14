// C++ test of the JSON lines reader (csrc/records.h) without Python: records of every format come out as
// to_record makes them, lines the reader cannot reproduce exactly are handed back with their byte ranges,
// blank lines give nothing, the thread count does not change the columns, UTF-8 is checked as Python's strict
// decoder does, and record_texts joins a chat's non-system turns. Built with -DMLMIX_BUILD_TESTS=ON; run
// build/dev/test_records (exit 0 = pass).
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "check.h"
#include "records.h"
#include "utf8.h"

namespace {

using mlmix_test::failures;
using mlmix_test::throws_invalid;
using namespace mlmix::records;

RecordOptions default_options() {
  RecordOptions opt;
  opt.roles = {{"human", "user"},     {"gpt", "assistant"},       {"bot", "assistant"}, {"model", "assistant"},
               {"user", "user"},      {"assistant", "assistant"}, {"system", "system"}, {"tool", "tool"}};
  opt.id_prefix = "src:";
  opt.where_prefix = "f.jsonl:";
  return opt;
}

RecordColumns read(const std::string& text, const RecordOptions& opt, int64_t first_line = 1) {
  return read_json_lines(reinterpret_cast<const uint8_t*>(text.data()), text.size(), first_line, opt);
}

std::string str(const StringColumn& c, size_t i) {
  return std::string(c.values.begin() + c.offsets[i], c.values.begin() + c.offsets[i + 1]);
}

// Every field of record i as one string: id|lang|where|role:content|...
std::string describe(const RecordColumns& r, size_t i) {
  std::string s = str(r.id, i) + "|" + (r.has_lang[i] ? str(r.lang, i) : "<none>") + "|" + str(r.where, i);
  s += r.kind[i] == kText ? "|text" : "|chat";
  for (int64_t t = r.turn_offsets[i]; t < r.turn_offsets[i + 1]; ++t)
    s += "|" + str(r.role, static_cast<size_t>(t)) + ":" + str(r.content, static_cast<size_t>(t));
  return s;
}

// The one record of a single line, or "<handback>" / "<blank>".
std::string one(const std::string& line, const RecordOptions& opt = default_options()) {
  RecordColumns r = read(line, opt);
  if (!r.handback_line.empty()) return "<handback>";
  if (r.size() == 0) return "<blank>";
  return describe(r, 0);
}

void test_formats() {
  EXPECT(one(R"({"id": "a", "lang": "en", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]})") ==
         "a|en|f.jsonl:1|chat|user:q|assistant:r");
  EXPECT(one(R"({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "r"}], "system": "s"})") ==
         "src:1|<none>|f.jsonl:1|chat|system:s|user:q|assistant:r");
  EXPECT(one(R"({"instruction": "i", "input": "x", "output": "o", "id": 17})") ==
         "17|<none>|f.jsonl:1|chat|user:i\n\nx|assistant:o");
  EXPECT(one(R"({"instruction": "i", "input": "", "output": "o"})") == "src:1|<none>|f.jsonl:1|chat|user:i|assistant:o");
  EXPECT(one(R"({"question": "q", "answer": "a", "lang": ""})") == "src:1|<none>|f.jsonl:1|chat|user:q|assistant:a");
  EXPECT(one(R"({"text": "t", "lang": "sw"})") == "src:1|sw|f.jsonl:1|text|:t");
  EXPECT(one(R"({"content": "c", "messages_x": 1})") == "<handback>");  // prompt_response without fields
  // auto: a key present with null still picks the format
  EXPECT(one(R"({"messages": null, "conversations": [{"from": "gpt", "value": "v"}]})") ==
         "src:1|<none>|f.jsonl:1|chat|assistant:v");
  EXPECT(one(R"({"text": "t", "prompt": null, "response": "r"})") == "<handback>");  // prompt_response, no prompt
  // duplicate keys: the last wins
  EXPECT(one(R"({"prompt": "a", "prompt": "b", "response": "r"})") == "src:1|<none>|f.jsonl:1|chat|user:b|assistant:r");
  // escapes, keys included
  EXPECT(one(R"({"\u0070rompt": "\u00e9\ud83d\ude00\n\"\\\/", "response": "\t"})") ==
         "src:1|<none>|f.jsonl:1|chat|user:\xc3\xa9\xf0\x9f\x98\x80\n\"\\/|assistant:\t");

  RecordOptions opt = default_options();
  opt.format = RecordFormat::kText;
  opt.field_text = "body";
  opt.lang_from_field = false;
  opt.lang = "cs";
  opt.id_field = "uid";
  EXPECT(one(R"({"body": "b", "uid": "u", "lang": "en"})", opt) == "u|cs|f.jsonl:1|text|:b");
  EXPECT(one(R"({"text": "b"})", opt) == "<handback>");
  opt.lang.reset();
  EXPECT(one(R"({"body": "b"})", opt) == "src:1|<none>|f.jsonl:1|text|:b");

  RecordOptions chat = default_options();
  chat.roles.push_back({"customer", "user"});
  chat.roles.push_back({"user", "assistant"});  // a later mapping wins, as in {**defaults, **roles}
  chat.field_role = "speaker";
  EXPECT(one(R"({"messages": [{"speaker": "customer", "content": "c"}, {"speaker": "user", "value": "x", "content": "d"}]})", chat) ==
         "src:1|<none>|f.jsonl:1|chat|user:c|assistant:d");
}

void test_handbacks() {
  const char* lines[] = {
      "{\"prompt\": \"p\", \"response\": NaN}",
      "{\"prompt\": \"\\ud800\", \"response\": \"r\"}",
      "{\"id\": 1.5, \"prompt\": \"p\", \"response\": \"r\"}",
      "{\"id\": -0, \"prompt\": \"p\", \"response\": \"r\"}",
      "{\"id\": true, \"prompt\": \"p\", \"response\": \"r\"}",
      "{\"lang\": 3, \"prompt\": \"p\", \"response\": \"r\"}",
      "{\"system\": 1, \"prompt\": \"p\", \"response\": \"r\"}",
      "{\"system\": 0.0, \"prompt\": \"p\", \"response\": \"r\"}",
      "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}]}",
      "{\"messages\": [{\"role\": \"alien\", \"content\": \"q\"}]}",
      "{\"prompt\": \"p\", \"response\": \"r\"",
      "{\"prompt\": \"a\x01\", \"response\": \"r\"}",
      "\xef\xbb\xbf{\"prompt\": \"p\", \"response\": \"r\"}",
      "{\"prompt\": \"\xc3\", \"response\": \"r\"}",
      "[1]",
      "\xc2\xa0",
  };
  for (const char* line : lines) EXPECT(one(line) == "<handback>");
  EXPECT(one("{\"system\": 0, \"prompt\": \"p\", \"response\": \"r\"}") != "<handback>");
  EXPECT(one("{\"system\": [], \"prompt\": \"p\", \"response\": \"r\"}") != "<handback>");
  EXPECT(one("{\"id\": -12, \"prompt\": \"p\", \"response\": \"r\"}").rfind("-12|", 0) == 0);

  std::string deep = "{\"prompt\": \"p\", \"response\": \"r\", \"m\": " + std::string(511, '[') + std::string(511, ']') + "}";
  EXPECT(one(deep) != "<handback>");
  deep = "{\"prompt\": \"p\", \"response\": \"r\", \"m\": " + std::string(512, '[') + std::string(512, ']') + "}";
  EXPECT(one(deep) == "<handback>");
  RecordOptions shallow = default_options();
  shallow.max_depth = 1;
  EXPECT(one("{\"prompt\": \"p\", \"response\": \"r\", \"m\": []}", shallow) == "<handback>");
  EXPECT(one("{\"prompt\": \"p\", \"response\": \"r\"}", shallow) != "<handback>");
  shallow.max_depth = 600;
  EXPECT(throws_invalid([&] { read("{}", shallow); }));
}

void test_lines_and_blanks() {
  const std::string text =
      "{\"text\": \"a\"}\n"
      "\n"
      "  \t\r\n"
      "\x1c\x0b\x0c\n"
      "{bad}\n"
      "{\"text\": \"b\"}\r\n"
      "{\"text\": \"c\"}";  // no newline at the end
  RecordColumns r = read(text, default_options(), 40);
  EXPECT(r.size() == 3);
  EXPECT(r.line == (std::vector<int64_t>{40, 45, 46}));
  EXPECT(str(r.where, 2) == "f.jsonl:46" && str(r.id, 1) == "src:45");
  EXPECT(r.handback_line == std::vector<int64_t>{44});
  EXPECT(r.lines == 7);
  EXPECT(r.handback_begin.size() == 1 && text.substr(r.handback_begin[0], r.handback_end[0] - r.handback_begin[0]) == "{bad}\n");
  EXPECT(read("", default_options()).size() == 0);
}

void test_threads() {
  std::mt19937_64 rng(7);
  std::string text;
  for (int i = 0; i < 20000; ++i) {
    switch (rng() % 5) {
      case 0: text += "{\"id\": " + std::to_string(i) + ", \"text\": \"" + std::string(rng() % 200, 'x') + "\"}\n"; break;
      case 1: text += "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"\\u4f60" + std::string(rng() % 300, 'y') + "\"}]}\n"; break;
      case 2: text += "\n"; break;
      case 3: text += "{\"prompt\": 1.5}\n"; break;
      default: text += "{\"prompt\": \"p\", \"response\": \"r\", \"lang\": \"en\"}\n"; break;
    }
  }
  RecordOptions opt = default_options();
  opt.num_threads = 1;
  const RecordColumns a = read(text, opt, 3);
  for (int t : {2, 3, 8}) {
    opt.num_threads = t;
    const RecordColumns b = read(text, opt, 3);
    EXPECT(a.kind == b.kind && a.has_lang == b.has_lang && a.turn_offsets == b.turn_offsets && a.line == b.line);
    EXPECT(a.id.values == b.id.values && a.id.offsets == b.id.offsets);
    EXPECT(a.lang.values == b.lang.values && a.where.values == b.where.values && a.where.offsets == b.where.offsets);
    EXPECT(a.role.values == b.role.values && a.role.offsets == b.role.offsets);
    EXPECT(a.content.values == b.content.values && a.content.offsets == b.content.offsets);
    EXPECT(a.handback_line == b.handback_line && a.handback_begin == b.handback_begin && a.handback_end == b.handback_end);
  }
  EXPECT(a.size() > 10000 && !a.handback_line.empty());
}

void test_utf8() {
  auto ok = [](const char* s) { return mlmix::utf8::valid(reinterpret_cast<const uint8_t*>(s), std::strlen(s)); };
  EXPECT(ok("plain ascii long enough to use the wide path") && ok("\xc3\xa9\xe4\xbd\xa0\xf0\x9f\x98\x80"));
  EXPECT(ok("\xed\x9f\xbf") && ok("\xee\x80\x80") && ok("\xf4\x8f\xbf\xbf"));
  EXPECT(!ok("\xc0\xaf") && !ok("\xe0\x80\xaf") && !ok("\xed\xa0\x80") && !ok("\xf4\x90\x80\x80"));
  EXPECT(!ok("\xf5\x80\x80\x80") && !ok("\x80") && !ok("abc\xc3") && !ok("\xe4\xbd") && !ok("\xff"));
}

void test_record_texts() {
  // records: text "t"; chat system/user/assistant; chat with no non-system turn
  const std::vector<uint8_t> kind = {kText, kChat, kChat};
  const std::vector<int64_t> turns = {0, 1, 4, 5};
  const std::string roles = "systemuserassistantsystem";
  const std::vector<int64_t> role_off = {0, 0, 6, 10, 19, 25};
  const std::string contents = "tSQAS";
  const std::vector<int64_t> content_off = {0, 1, 2, 3, 4, 5};
  RecordTextsInput in;
  in.count = 3;
  in.kind = kind.data();
  in.turn_offsets = turns.data();
  in.turns = 5;
  in.role_values = reinterpret_cast<const uint8_t*>(roles.data());
  in.role_bytes = static_cast<int64_t>(roles.size());
  in.role_offsets = role_off.data();
  in.content_values = reinterpret_cast<const uint8_t*>(contents.data());
  in.content_bytes = static_cast<int64_t>(contents.size());
  in.content_offsets = content_off.data();
  const StringColumn out = record_texts(in, 2);
  EXPECT(out.size() == 3 && str(out, 0) == "t" && str(out, 1) == "Q\nA" && str(out, 2).empty());
  std::vector<int64_t> bad = content_off;
  bad[5] = 99;
  in.content_offsets = bad.data();
  EXPECT(throws_invalid([&] { record_texts(in); }));
  in.content_offsets = content_off.data();
  const std::vector<int64_t> two_turn_text = {0, 2, 4, 5};
  in.turn_offsets = two_turn_text.data();
  EXPECT(throws_invalid([&] { record_texts(in); }));
}

// Random byte edits of valid lines: whatever comes out is consistent (offsets in range, each line a record, a
// hand-back or blank, in order) and, under tools/sanitize.sh's ASan build, nothing reads out of bounds.
void test_mutations() {
  const std::string seeds[] = {
      "{\"id\": 3, \"lang\": \"cs\", \"messages\": [{\"role\": \"user\", \"content\": \"Ahoj \\ud83d\\ude00\"}, "
      "{\"role\": \"assistant\", \"content\": \"\xc4\x8cau\"}]}\n",
      "{\"conversations\": [{\"from\": \"human\", \"value\": \"\xe4\xbd\xa0\"}, {\"from\": \"gpt\", \"value\": \"x\\n\"}], "
      "\"system\": \"s\"}\n",
      "{\"instruction\": \"i\", \"input\": \"x\", \"output\": \"o\", \"id\": \"a\\\\b\"}\n",
      "{\"text\": \"plain \\\"text\\\"\", \"lang\": null, \"meta\": [1, 2.5e-3, {\"k\": [true, false]}]}\n",
  };
  const char specials[] = "{}[]\",:\\ \n\t\r0123456789-+.eEtrufalsnu\x80\xc3\xe4\xf0\xff\xed";
  std::mt19937_64 rng(11);
  RecordOptions opt = default_options();
  for (int trial = 0; trial < 20000; ++trial) {
    std::string text;
    const int lines = 1 + static_cast<int>(rng() % 4);
    for (int l = 0; l < lines; ++l) {
      std::string line = seeds[rng() % 4];
      for (int e = 0, edits = 1 + static_cast<int>(rng() % 3); e < edits; ++e) {
        const size_t k = rng() % (line.size() + 1);
        switch (rng() % 4) {
          case 0: if (k < line.size()) line[k] = specials[rng() % (sizeof(specials) - 1)]; break;
          case 1: if (k < line.size()) line.erase(k, 1); break;
          case 2: line.insert(k, 1, specials[rng() % (sizeof(specials) - 1)]); break;
          default: line.resize(k); break;
        }
      }
      text += line;
    }
    opt.num_threads = 1 + static_cast<int>(rng() % 2);
    const RecordColumns r = read(text, opt, 1);
    bool ok = r.kind.size() == r.line.size() && r.turn_offsets.size() == r.size() + 1 &&
              r.id.size() == r.size() && r.where.size() == r.size() && r.role.size() == r.content.size() &&
              static_cast<size_t>(r.turn_offsets.back()) == r.role.size();
    for (size_t i = 0; ok && i < r.handback_line.size(); ++i)
      ok = r.handback_begin[i] < r.handback_end[i] && r.handback_end[i] <= static_cast<int64_t>(text.size());
    for (size_t i = 1; ok && i < r.content.offsets.size(); ++i) ok = r.content.offsets[i] >= r.content.offsets[i - 1];
    ok = ok && static_cast<int64_t>(r.size() + r.handback_line.size()) <= r.lines;
    EXPECT(ok);
    if (!ok) return;
  }
}

}  // namespace

int main() {
  test_formats();
  test_handbacks();
  test_lines_and_blanks();
  test_threads();
  test_utf8();
  test_record_texts();
  test_mutations();
  if (failures) {
    std::fprintf(stderr, "test_records: %d failure(s)\n", failures);
    return 1;
  }
  std::printf("test_records: ok\n");
  return 0;
}
