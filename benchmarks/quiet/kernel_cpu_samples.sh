#!/bin/bash
# CPU time the attnkern kernels spend per bf16 forward+backward call, from perf's cpu-clock samples
# (1 kHz: one sample per ms of CPU) in attnkern's extension only: time slicing by other processes
# does not inflate it (cache pollution still can), so it resolves kernel changes on a shared
# machine where wall-clock ratios do not. Two builds, alternating:
#   benchmarks/quiet/kernel_cpu_samples.sh THIS_CHECKOUT BASELINE_CHECKOUT ROUNDS [L D HKV SOFTCAP REPS]
# (run with the venv that has torch active) defaults: the Gemma-2-like call (L 4096, D 256, 8/4 heads, causal window (L-1, 0), softcap 50), 3 calls.
set -e
this=$1; base=$2; rounds=$3; L=${4:-4096}; D=${5:-256}; HKV=${6:-4}; CAP=${7:-50}; REPS=${8:-3}
child='
import sys, torch, attnkern
torch.manual_seed(0)
L, D, hkv, cap, reps = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
q, k, v = (torch.randn(1, h, L, D, dtype=torch.bfloat16, requires_grad=True) for h in (8, hkv, hkv))
for _ in range(reps):
    o = attnkern.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=hkv != 8, softcap=cap,
                                              window_size=(L - 1, 0) if cap else None, backend="cpu")
    o.backward(torch.ones_like(o))
'
data=$(mktemp)
for r in $(seq 1 "$rounds"); do
  for name in this baseline; do
    root=$this; [ $name = baseline ] && root=$base
    PYTHONPATH=$root perf record -q -F 1000 -o "$data" python -c "$child" "$L" "$D" "$HKV" "$CAP" "$REPS" >/dev/null 2>&1
    perf report -i "$data" --dsos _C.cpython-311-x86_64-linux-gnu.so --sort sym -n --stdio 2>/dev/null | grep -v "^#" |
      awk -v n=$name -v reps="$REPS" -v load="$(cut -d' ' -f1 /proc/loadavg)" \
        'NF > 2 { s += $2 } END { printf "%s: kernel CPU %.0f ms per forward+backward (load average %s)\n", n, s / reps, load }'
  done
done
rm -f "$data"
