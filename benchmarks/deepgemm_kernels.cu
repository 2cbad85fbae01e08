// Host tool (no GPU): the DeepGEMM kernel flashinfer's sm90 fp8 block-scale GEMM picks for an
// M x N x K product, written where its runtime JIT looks for it.
//
// flashinfer 0.7.4's TensorRT-LLM runner chooses a tile per product (deep_gemm::jit::
// get_best_gemm_config: block M/N, stages, TMA multicast, from M, N, K and the SM count) and
// compiles that kernel with nvcc at first use into $TRTLLM_DG_CACHE_DIR/cache/<name>/. This
// tool calls the same two functions of flashinfer's headers (the config choice and the kernel
// source) and writes <out>/<name>/kernel.cu, then prints <name>; benchmarks/flashinfer_aot.sh
// compiles each with the runner's nvcc flags into nvcc_kernel.cubin, so the GPU machine finds
// them cached.
//
// Usage: deepgemm_kernels M N K NUM_SMS OUT_DIR
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "deep_gemm/compiler.cuh"

int main(int argc, char** argv) {
  if (argc != 6) {
    std::fprintf(stderr, "usage: %s M N K NUM_SMS OUT_DIR\n", argv[0]);
    return 2;
  }
  uint32_t const m = std::atoi(argv[1]), n = std::atoi(argv[2]), k = std::atoi(argv[3]);
  int const sms = std::atoi(argv[4]);
  auto const [block_m, block_n, stages, multicast, smem] =
      deep_gemm::jit::get_best_gemm_config(m, n, k, 1, sms, false, false);
  (void)smem;
  // the runner's cache name (deep_gemm::jit::Compiler::build, one group, block K 128)
  std::string const st = std::to_string(stages);
  std::string const name = "gemm_" + std::to_string(n) + "_" + std::to_string(k) + "_" +
                           std::to_string(block_m) + "_" + std::to_string(block_n) + "_128_1_" +
                           st + "1_" + st + "_" + std::to_string(multicast) + "_Normal";
  std::filesystem::path const dir = std::filesystem::path(argv[5]) / name;
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "kernel.cu") << deep_gemm::jit::generateKernel(
      n, k, block_m, block_n, 128, 1, stages, multicast, deep_gemm::GemmType::Normal, false);
  std::printf("%s\n", name.c_str());
  return 0;
}
