// C++ test of the native language identifier without Python, on a hand-made model: a one-row DFA
// whose bytes 'a' and 'b' are the two features (and 'c' a state without one), two classes. Checks the
// scores against a direct computation, the strip / cut / "needs preparation" rules, str views of every
// width against UTF-8, invalid UTF-8 (the lowest bad text is named), selections, thread-count
// independence and the model checks. Built with -DMLMIX_BUILD_TESTS=ON; run build/dev/test_langid.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "check.h"
#include "langid.h"

namespace {

using mlmix_test::failures;
using mlmix_test::throws_invalid;

using namespace mlmix::langid;
using mlmix::TextView;

struct Tiny {
  std::vector<uint32_t> nextmove = std::vector<uint32_t>(256, 0);
  std::vector<uint32_t> state_row = {0, 0, 0, 0};
  std::vector<int32_t> state_feature = {-1, 0, 1, -1};
  std::vector<int16_t> ptc = {-2, -6,   // feature 'a': class 0 likes it
                              -6, -2};  // feature 'b': class 1 likes it
  std::vector<float> pc = {-0.5f, -1.0f};
  std::vector<float> log1p;
  std::vector<uint8_t> flags = std::vector<uint8_t>(0x400, 0), ccc = std::vector<uint8_t>(0x400, 0);
  std::vector<uint64_t> pairs = {(uint64_t{'e'} << 21) | 0x301};
  Model m;
  TextRules r;
  Selection all;

  Tiny() {
    nextmove['a'] = 1;
    nextmove['b'] = 2;
    nextmove['c'] = 3;
    for (int i = 0; i < 8; ++i) log1p.push_back(std::log1p(static_cast<float>(i)));
    for (char c : std::string(" \t\n\r")) flags[static_cast<uint8_t>(c)] = kSpace;
    for (int c = 'A'; c <= 'Z'; ++c) flags[c] = kUpper;
    for (int c = 'a'; c <= 'z'; ++c) flags[c] = kLowerOrTitle;
    flags[0x3000 % 0x400] = 0;
    flags[0x85] = kSpace;
    flags[0x301] = kNfcMaybe;
    ccc[0x301] = 230;
    ccc[0x316] = 220;
    flags[0x340] = kNfcNo | kDecomposable;
    flags[0x3AC] = kLowerOrTitle | kDecomposable;  // a composite starter (alpha with tonos)
    ccc[0x340] = 230;
    m = Model{nextmove.data(), 1, state_row.data(), state_feature.data(), 4, ptc.data(), 0.25, pc.data(), 2, 2,
              log1p.data(), static_cast<int64_t>(log1p.size())};
    r = TextRules{flags.data(), ccc.data(), static_cast<int64_t>(flags.size()), pairs.data(), 1};
    all = make_selection(m, {0, 1}, std::vector<int32_t>{0, 1}.data());
  }
};

struct Out {
  std::vector<int32_t> label;
  std::vector<double> prob;
};

Out run(const Tiny& t, const std::vector<std::string>& docs, Options o = {}, const Selection* sel = nullptr) {
  std::string data;
  std::vector<int64_t> offsets = {0};
  for (const auto& d : docs) {
    data += d;
    offsets.push_back(static_cast<int64_t>(data.size()));
  }
  Texts texts{reinterpret_cast<const uint8_t*>(data.data()), offsets.data(), static_cast<int64_t>(docs.size())};
  Out out{std::vector<int32_t>(docs.size()), std::vector<double>(docs.size())};
  classify(t.m, sel ? *sel : t.all, t.r, texts, o, out.label.data(), out.prob.data());
  return out;
}

// The expected label and probability of a text with `na` a's and `nb` b's among `n` bytes.
std::pair<int32_t, double> expected(const Tiny& t, int na, int nb, int64_t n) {
  // counts beyond the table: the float32 rounding of the double log1p
  auto w = [&](int k) { return k < 8 ? t.log1p[k] : static_cast<float>(std::log1p(static_cast<double>(k))); };
  double s[2];
  for (int c = 0; c < 2; ++c) {
    double v = 0;
    if (na) v += static_cast<double>(w(na)) * 0.25 * t.ptc[0 * 2 + c];
    if (nb) v += static_cast<double>(w(nb)) * 0.25 * t.ptc[1 * 2 + c];
    s[c] = (na || nb) ? (v + t.pc[c]) / std::sqrt(static_cast<double>(n)) : 0.0;
  }
  const double top = std::max(s[0], s[1]);
  const double e0 = std::exp(s[0] - top), e1 = std::exp(s[1] - top);
  const double p0 = e0 / (e0 + e1), p1 = e1 / (e0 + e1);
  return p1 > p0 ? std::make_pair(1, p1) : std::make_pair(0, p0);
}

bool close(double a, double b) { return std::fabs(a - b) <= 1e-12 * std::fabs(b); }

void test_scores() {
  const Tiny t;
  const std::vector<std::string> docs = {"aab", "abbbb", "ab", "a", "b", "xxaxxbbx", "ccc", "aaaaaaaaaa"};
  const Out o = run(t, docs);
  const int counts[][3] = {{2, 1, 3}, {1, 4, 5}, {1, 1, 2}, {1, 0, 1}, {0, 1, 1}, {1, 2, 8}, {0, 0, 3}, {10, 0, 10}};
  for (size_t i = 0; i < docs.size(); ++i) {
    const auto [label, prob] = expected(t, counts[i][0], counts[i][1], counts[i][2]);
    EXPECT(o.label[i] == label);
    EXPECT(close(o.prob[i], prob));
  }
  EXPECT(o.label[6] == 0 && o.prob[6] == 0.5);  // no feature: uniform, the first class
  EXPECT(o.label[1] == 1 && o.label[0] == 0);
}

void test_strip_cut_and_preparation() {
  const Tiny t;
  const Out o = run(t, {"", " \t\n", "\xc2\x85 ", " a ", "AB", "Ab", "e\xcc\x81", "x\xcc\x81", "x\xcc\x81\xcc\x81",
                        "\xcd\x80", "x\xcc\x96\xcc\x81", "x\xcc\x81\xcc\x96", "\xcc\x81", "A1", "\xce\xac\xcc\x81"});
  EXPECT(o.label[0] == kEmpty && o.label[1] == kEmpty && o.label[2] == kEmpty && o.prob[0] == 0.0);
  EXPECT(o.label[3] == 0);
  EXPECT(o.label[4] == kNeedsPrep);   // all upper case: py3langid lower-cases it
  EXPECT(o.label[5] >= 0);
  EXPECT(o.label[6] == kNeedsPrep);   // e + U+0301 composes
  EXPECT(o.label[7] >= 0);            // x + U+0301 does not
  EXPECT(o.label[8] == kNeedsPrep);   // two marks: not decided natively
  EXPECT(o.label[9] == kNeedsPrep);   // NFC_QC = No
  EXPECT(o.label[10] == kNeedsPrep);  // (a maybe after another mark)
  EXPECT(o.label[11] == kNeedsPrep);  // marks out of canonical order
  EXPECT(o.label[12] >= 0);           // a mark with no starter before it
  EXPECT(o.label[13] == kNeedsPrep);
  EXPECT(o.label[14] == kNeedsPrep);  // a maybe after a composite starter: reordering could let it compose

  Options cut;
  cut.max_chars = 2;
  const Out c = run(t, {"aab", "  ab", "bba"}, cut);
  const auto e0 = expected(t, 2, 0, 2);
  EXPECT(c.label[0] == e0.first && close(c.prob[0], e0.second));
  EXPECT(c.label[1] >= 0);  // the cut is spaces, but the text is not empty
  EXPECT(close(c.prob[1], 0.5));

  Options prepared;
  prepared.prepared = true;
  const Out p = run(t, {"AB", "\xff\xfe", "", "aab"}, prepared);
  EXPECT(p.label[0] == 0 && close(p.prob[0], 0.5));  // no feature in "AB"
  EXPECT(p.label[1] == 0 && p.label[2] == 0);        // raw bytes, no checks
  EXPECT(p.label[3] == expected(t, 2, 1, 3).first && close(p.prob[3], expected(t, 2, 1, 3).second));
}

void test_str_views() {
  const Tiny t;
  // "aab\u00e9" + an astral char, as UTF-8 and as code units of every width
  const std::string utf8 = "aab\xc3\xa9";
  const uint8_t w1[] = {'a', 'a', 'b', 0xE9};
  const uint16_t w2[] = {'a', 'a', 'b', 0xE9};
  const uint32_t w4[] = {'a', 'a', 'b', 0xE9};
  const TextView views[] = {{utf8.data(), 5, 0}, {w1, 4, 1}, {w2, 4, 2}, {w4, 4, 4}};
  Texts texts{nullptr, nullptr, 4, views};
  std::vector<int32_t> label(4);
  std::vector<double> prob(4);
  classify(t.m, t.all, t.r, texts, Options{}, label.data(), prob.data());
  for (int i = 1; i < 4; ++i) EXPECT(label[i] == label[0] && prob[i] == prob[0]);
  EXPECT(close(prob[0], expected(t, 2, 1, 5).second));
  // a lone surrogate in a str is encoded as its 3 bytes (surrogatepass), counted in the length
  const uint16_t sur[] = {'a', 0xD800};
  const TextView sv[] = {{sur, 2, 2}};
  Texts st{nullptr, nullptr, 1, sv};
  classify(t.m, t.all, t.r, st, Options{}, label.data(), prob.data());
  EXPECT(close(prob[0], expected(t, 1, 0, 4).second));
}

void test_invalid_utf8() {
  const Tiny t;
  for (const std::string bad : {"\xff", "\xc0\x80", "\xe0\x80\x80", "\xed\xa0\x80", "\xf4\x90\x80\x80", "ab\xe2\x82"}) {
    std::string msg;
    try {
      run(t, {"ok", "fine", bad, "a", bad});
    } catch (const std::invalid_argument& e) {
      msg = e.what();
    }
    EXPECT(msg.find("texts[2]") != std::string::npos);
  }
  // after the cut too
  Options cut;
  cut.max_chars = 1;
  EXPECT(throws_invalid([&] { run(t, {"aaa\xff"}, cut); }));
}

void test_selection() {
  const Tiny t;
  const Selection merged = make_selection(t.m, {0, 1}, std::vector<int32_t>{0, 0}.data());
  const Out o = run(t, {"aab", "bbb"}, Options{}, &merged);
  EXPECT(o.label[0] == 0 && close(o.prob[0], 1.0) && o.label[1] == 0 && close(o.prob[1], 1.0));
  const Selection only1 = make_selection(t.m, {1}, std::vector<int32_t>{0}.data());
  const Out p = run(t, {"aaa"}, Options{}, &only1);
  EXPECT(p.label[0] == 0 && p.prob[0] == 1.0);
  EXPECT(throws_invalid([&] { make_selection(t.m, {1, 0}, std::vector<int32_t>{0, 1}.data()); }));
  EXPECT(throws_invalid([&] { make_selection(t.m, {0, 2}, std::vector<int32_t>{0, 1}.data()); }));
  EXPECT(throws_invalid([&] { make_selection(t.m, {0}, std::vector<int32_t>{1}.data()); }));
  EXPECT(throws_invalid([&] { make_selection(t.m, {}, nullptr); }));
}

void test_threads() {
  const Tiny t;
  std::mt19937_64 rng(7);
  std::vector<std::string> docs;
  const char alphabet[] = "abc AB\xc3\xa9";
  for (int i = 0; i < 2000; ++i) {
    std::string d;
    const int n = static_cast<int>(rng() % 40);
    for (int k = 0; k < n; ++k) d += alphabet[rng() % 6];
    docs.push_back(d);
  }
  Options one, many;
  one.num_threads = 1;
  many.num_threads = 5;
  const Out a = run(t, docs, one), b = run(t, docs, many);
  EXPECT(a.label == b.label);
  EXPECT(std::memcmp(a.prob.data(), b.prob.data(), a.prob.size() * sizeof(double)) == 0);
}

void test_model_checks() {
  Tiny t;
  check_model(t.m);
  t.nextmove[7] = 4;  // not a state
  EXPECT(throws_invalid([&] { check_model(t.m); }));
  t.nextmove[7] = 0;
  t.state_feature[3] = 2;  // not a feature
  EXPECT(throws_invalid([&] { check_model(t.m); }));
  t.state_feature[3] = -1;
  t.state_row[1] = 1;  // not a row
  EXPECT(throws_invalid([&] { check_model(t.m); }));
  t.state_row[1] = 0;
  t.m.ptc_unit = 0.3;
  EXPECT(throws_invalid([&] { check_model(t.m); }));
  t.m.ptc_unit = 0.25;
  check_model(t.m);
  std::vector<int64_t> offsets = {0, 3, 2};
  EXPECT(throws_invalid([&] { check_offsets(offsets.data(), 2, 10); }));
  offsets = {0, 3, 11};
  EXPECT(throws_invalid([&] { check_offsets(offsets.data(), 2, 10); }));
}

void test_large_buffer() {
  std::vector<uint32_t> big(3 << 20);
  for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<uint32_t>(i * 2654435761u);
  const LargeBuffer copy(big.data(), big.size() * sizeof(uint32_t));
  EXPECT(std::memcmp(copy.data(), big.data(), big.size() * sizeof(uint32_t)) == 0);
  const uint32_t small[] = {1, 2, 3};
  const LargeBuffer little(small, sizeof small);
  EXPECT(std::memcmp(little.data(), small, sizeof small) == 0);
}

// The walk's table against py3langid's arrays, both layouts: every entry names the next state's row and
// feature; and a multi-row model classifies the same through either.
void test_dfa_layouts() {
  std::mt19937 rng(7);
  const int64_t rows = 300, states = 1000, features = 50;
  Model m;
  std::vector<uint32_t> nextmove(rows * 256), state_row(states);
  std::vector<int32_t> state_feature(states);
  for (auto& v : nextmove) v = rng() % states;
  for (auto& v : state_row) v = rng() % rows;
  for (auto& v : state_feature) v = static_cast<int32_t>(rng() % (features + 1)) - 1;
  state_feature[static_cast<size_t>(states - 1)] = features - 1;
  std::vector<int16_t> ptc(features * 3);
  for (auto& v : ptc) v = static_cast<int16_t>(-static_cast<int>(rng() % 4000));
  std::vector<float> pc = {-0.5f, -1.0f, -2.0f}, log1p;
  for (int i = 0; i < 64; ++i) log1p.push_back(std::log1p(static_cast<float>(i)));
  m = Model{nextmove.data(), rows, state_row.data(), state_feature.data(), states, ptc.data(), 0.125, pc.data(),
            features, 3, log1p.data(), static_cast<int64_t>(log1p.size())};
  const Dfa narrow(m), wide(m, true);
  EXPECT(narrow.narrow() && !wide.narrow());
  EXPECT(narrow.start() == state_row[0] && wide.start() == state_row[0]);
  for (int64_t i = 0; i < rows * 256; ++i) {
    const uint32_t s = nextmove[static_cast<size_t>(i)];
    const uint32_t e = narrow.narrow_table()[i];
    const uint64_t w = wide.wide_table()[i];
    EXPECT(e % rows == state_row[s] && static_cast<int64_t>(e / rows) - 1 == state_feature[s]);
    EXPECT(static_cast<uint32_t>(w) == state_row[s] && static_cast<int64_t>(w >> 32) - 1 == state_feature[s]);
  }
  Tiny t;  // its text rules
  const Selection sel = make_selection(m, {0, 1, 2}, std::vector<int32_t>{0, 1, 2}.data());
  std::string data;
  std::vector<int64_t> offsets = {0};
  for (int d = 0; d < 200; ++d) {
    const int len = static_cast<int>(rng() % 300);
    for (int k = 0; k < len; ++k) data += static_cast<char>(k % 7 == 6 ? ' ' : 'a' + rng() % 26);
    offsets.push_back(static_cast<int64_t>(data.size()));
  }
  Texts texts{reinterpret_cast<const uint8_t*>(data.data()), offsets.data(), 200};
  std::vector<int32_t> la(200), lb(200);
  std::vector<double> pa(200), pb(200);
  classify(m, narrow, sel, t.r, texts, Options{}, la.data(), pa.data());
  classify(m, wide, sel, t.r, texts, Options{}, lb.data(), pb.data());
  EXPECT(la == lb);
  EXPECT(std::memcmp(pa.data(), pb.data(), pa.size() * sizeof(double)) == 0);
  int labelled = 0;
  for (const int32_t l : la) labelled += l >= 0;
  EXPECT(labelled > 150);
}

}  // namespace

int main() {
  test_scores();
  test_strip_cut_and_preparation();
  test_str_views();
  test_invalid_utf8();
  test_selection();
  test_threads();
  test_model_checks();
  test_large_buffer();
  test_dfa_layouts();
  if (failures) {
    std::fprintf(stderr, "test_langid: %d failure(s)\n", failures);
    return 1;
  }
  std::printf("test_langid: ok\n");
  return 0;
}
