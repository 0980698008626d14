#include "common.h"

#include <cstdlib>
#include <thread>

namespace mlmix {

int resolve_threads(int requested) {
  if (requested > 0) return requested;
  if (const char* env = std::getenv("MLMIX_NUM_THREADS")) {
    int n = std::atoi(env);
    if (n > 0) return n;
  }
  unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(hw);
}

}  // namespace mlmix
