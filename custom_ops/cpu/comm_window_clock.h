// Time as the communication window measures it: seconds on the steady clock since the first
// call (deadlines, idle times), and how error messages print a duration.
#ifndef MOE_EP_COMM_WINDOW_CLOCK_H_
#define MOE_EP_COMM_WINDOW_CLOCK_H_

#include <chrono>
#include <iomanip>
#include <sstream>
#include <string>

namespace moe_ep::comm {

inline double SecondsSinceStart() {
  using Clock = std::chrono::steady_clock;
  static const Clock::time_point start = Clock::now();
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// "60.0 s"
inline std::string DescribeSeconds(double seconds) {
  std::ostringstream text;
  text << std::fixed << std::setprecision(1) << seconds << " s";
  return text.str();
}

}  // namespace moe_ep::comm

#endif  // MOE_EP_COMM_WINDOW_CLOCK_H_
