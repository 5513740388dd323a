"""Helper benchmark: one 3x3 SAME convolution written several ways (XLA CPU).

Used to pick the formulation of each UNet layer in `perfjax.model.fast_unet_apply`.
Prints one JSON line per (layer, variant): min and median ms over repeats and GFLOP/s.

  XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=reduce JAX_PLATFORMS=cpu \
    .venv/bin/python benchmarks/bench_layers.py --batch 32
"""
import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
from jax import lax

# (size, cin, cout) of every 3x3 conv of the f=16 UNet with a 64x64x30 input.
LAYERS = [(64, 30, 16), (64, 16, 16), (64, 32, 16), (32, 16, 32), (32, 32, 32), (32, 64, 32),
          (16, 32, 64), (16, 64, 64), (16, 128, 64), (8, 64, 128), (8, 128, 128)]


def conv_xla(x, k):
  return lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv_im2col(x, k):
  b, h, w, c = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  cols = jnp.concatenate([xp[:, i:i + h, j:j + w] for i in range(3) for j in range(3)], -1)
  return jnp.dot(cols.reshape(-1, 9 * c), k.reshape(9 * c, -1)).reshape(b, h, w, -1)


def conv_rows(x, k):
  """Concatenate the 3 column shifts, one matmul to 3 row-tap outputs, add 3 row shifts."""
  b, h, w, c = x.shape
  co = k.shape[-1]
  xp = jnp.pad(x, ((0, 0), (0, 0), (1, 1), (0, 0)))
  cols = jnp.concatenate([xp[:, :, j:j + w] for j in range(3)], -1)  # [b,h,w,3c] (dx, c)
  wk = k.transpose(1, 2, 0, 3).reshape(3 * c, 3 * co)  # rows (dx, c), cols (dy, co)
  y = jnp.dot(cols.reshape(-1, 3 * c), wk).reshape(b, h, w, 3, co)
  yp = jnp.pad(y, ((0, 0), (1, 1), (0, 0), (0, 0), (0, 0)))
  return yp[:, 0:h, :, 0] + yp[:, 1:h + 1, :, 1] + yp[:, 2:h + 2, :, 2]


def conv_taps(x, k):
  """One matmul to all 9 tap outputs [.., 9*co], then add 9 shifted slices."""
  b, h, w, c = x.shape
  co = k.shape[-1]
  y = jnp.dot(x.reshape(-1, c), k.transpose(2, 0, 1, 3).reshape(c, 9 * co)).reshape(b, h, w, 3, 3, co)
  yp = jnp.pad(y, ((0, 0), (1, 1), (1, 1), (0, 0), (0, 0), (0, 0)))
  return sum(yp[:, i:i + h, j:j + w, i, j] for i in range(3) for j in range(3))


def conv_winograd(x, k):
  """Winograd F(2x2, 3x3): 16 channel matmuls per 2x2 output tile instead of 36."""
  b, h, w, c = x.shape
  co = k.shape[-1]
  g = jnp.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], k.dtype)
  u = jnp.einsum("ay,yxio,bx->abio", g, k, g).reshape(16, c, co)
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  r = [xp[:, i:i + h:2] for i in range(4)]
  t = [r[0] - r[2], r[1] + r[2], r[2] - r[1], r[1] - r[3]]
  v = []
  for ta in t:
    cc = [ta[:, :, j:j + w:2] for j in range(4)]
    v += [cc[0] - cc[2], cc[1] + cc[2], cc[2] - cc[1], cc[1] - cc[3]]
  v = jnp.stack(v).reshape(16, -1, c)
  m = jnp.einsum("tnc,tco->tno", v, u).reshape(4, 4, b, h // 2, w // 2, co)
  s = [m[:, 0] + m[:, 1] + m[:, 2], m[:, 1] - m[:, 2] - m[:, 3]]  # columns' inverse
  y = [[sb[0] + sb[1] + sb[2], sb[1] - sb[2] - sb[3]] for sb in s]  # [col][row]
  y = jnp.stack([jnp.stack([y[0][0], y[1][0]], -2), jnp.stack([y[0][1], y[1][1]], -2)], 2)
  return y.reshape(b, h, w, co)


VARIANTS = {"xla": conv_xla, "im2col": conv_im2col, "rows": conv_rows, "taps": conv_taps,
            "winograd": conv_winograd}


def timeit(fn, reps):
  """Min wall time, and median process CPU time / 2 (robust on a shared 2-core machine)."""
  jax.block_until_ready(fn())
  ts, cs = [], []
  for _ in range(reps):
    t0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    ts.append(time.perf_counter() - t0)
    cs.append((time.process_time() - c0) / 2)
  return min(ts), statistics.median(cs)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--reps", type=int, default=7)
  ap.add_argument("--variants", default="xla,im2col,rows,taps,winograd")
  ap.add_argument("--layers", default="", help="indices into LAYERS, comma-separated")
  args = ap.parse_args()
  idx = [int(i) for i in args.layers.split(",")] if args.layers else range(len(LAYERS))
  for i in idx:
    size, ci, co = LAYERS[i]
    x = jax.random.uniform(jax.random.key(0), (args.batch, size, size, ci))
    k = jax.random.normal(jax.random.key(1), (3, 3, ci, co)) * 0.1
    ref = None
    for name in args.variants.split(","):
      fn = jax.jit(lambda x, k, f=VARIANTS[name]: jax.nn.relu(f(x, k)))
      out = fn(x, k)
      ref = out if ref is None else ref
      tmin, tmed = timeit(lambda: fn(x, k), args.reps)
      flops = 2 * args.batch * size * size * 9 * ci * co
      print(json.dumps(dict(layer=LAYERS[i], variant=name, batch=args.batch, ms_min=round(tmin * 1e3, 2),
                            cpu_ms_half=round(tmed * 1e3, 2), gflops_best=round(flops / tmin / 1e9, 1),
                            err=float(jnp.abs(out - ref).max()),
                            xla_flags=os.environ.get("XLA_FLAGS", ""))), flush=True)


if __name__ == "__main__":
  main()
