// C++ use of attnkern without Python: call attnkern::fwd through torch's dispatcher and
// compare with ATen's scaled_dot_product_attention computed in float64.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <iostream>
#include <random>

int main() {
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("attnkern::fwd", "")
                .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                          const std::optional<at::Tensor>&,
                                                          const std::optional<at::Tensor>&, double, int64_t, int64_t,
                                                          bool, double, double, const std::optional<at::Tensor>&,
                                                          const std::optional<at::Tensor>&)>();
  at::manual_seed(std::random_device{}());
  at::Tensor q = at::randn({2, 4, 100, 64}), k = at::randn({2, 4, 120, 64}), v = at::randn({2, 4, 120, 64});
  const double scale = 1.0 / std::sqrt(64.0);
  // causal; no softcap, sinks or ALiBi slopes
  auto [out, lse] = op.call(q, k, v, std::nullopt, std::nullopt, scale, -1, 0, false, 0.0, 0.0, std::nullopt,
                            std::nullopt);
  at::Tensor ref = at::scaled_dot_product_attention(q.to(at::kDouble), k.to(at::kDouble), v.to(at::kDouble), {}, 0.0,
                                                    /*is_causal=*/true);
  const double err = ((out.to(at::kDouble) - ref).norm() / ref.norm()).item<double>();
  std::cout << "attnkern::fwd from C++: relative error vs ATen float64 = " << err << std::endl;
  return err < 2e-5 ? 0 : 1;
}
