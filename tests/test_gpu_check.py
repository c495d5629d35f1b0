"""benchmarks/gpu_check.py: the whole device check runs end to end in its tiny mode (here on the CPU) and ends
with its Markdown table; its kernel classification sorts the kernel names a GPU profile shows."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402
from gpu_check import classify  # noqa: E402


def test_tiny_check_runs_end_to_end_and_writes_its_table(tmp_path: Path, capsys):
    """In this process (the script's main), which has torch and its compiler loaded already."""
    out = tmp_path / "gpu_check.md"
    status = gpu_check.main(["--tiny", "--cpu", "--steps", "4", "--compile", "aot_eager", "--views", "16",
                             "--out", str(out)])
    printed = capsys.readouterr().out
    assert status == 0, printed[-3000:]
    table = out.read_text()
    assert table in printed
    for check in ("gradient gate (bf16 autocast, 1 step) | pass", "SDPA kernel | flash (CPU)",
                  "eager: full training loop, 4 steps", "compiled blocks (aot_eager): forward+backward alone",
                  "prediction |", "wall time of this check"):
        assert check in table, check
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["gate"] == [] and report["profile"]["rows"] == 8
    assert sum(report["profile"]["share"].values()) == pytest.approx(1.0)
    assert report["profile"]["share"]["gemm"] > 0 and report["profile"]["share"]["attention"] > 0
    for arm in ("eager", "compiled"):
        assert report[arm]["s_per_step"] > 0 and report[arm]["fwd_bwd_s_per_step"] > 0
    assert report["predict"]["views"] > 0 and report["predict"]["views_per_s"] > 0


@pytest.mark.parametrize("name, kind", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1", "gemm"),
    ("nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_NTT", "gemm"),
    ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x1_tn_align8>", "gemm"),
    ("aten::addmm", "gemm"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, false, false, bf16>>", "attention"),
    ("fmha_cutlassB_bf16_aligned_64x64_k64_sm80", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64", "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>", "elementwise"),
    ("triton_poi_fused__to_copy_add_mul_rsqrt_0", "elementwise"),
    ("ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevComm*, unsigned long, ncclWork*)", "copy/comm"),
    ("Memcpy HtoD (Pinned -> Device)", "copy/comm"),
    ("ProfilerStep#3", "other"),
])
def test_kernel_names_are_classified(name: str, kind: str):
    assert classify(name) == kind
