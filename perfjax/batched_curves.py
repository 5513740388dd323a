"""Frame gains and curves of many slices in two jitted calls, for an accelerator (issue 13).

The rules are those of `perfjax.frame_gain` and `perfjax.extraction` (their constants, their
verdicts and their small per-slice steps are imported, not repeated); this is their vectorised
form, so that a GPU does not wait on a per-slice numpy loop. A slice's pixel sets (the body
outside the heart, the eroded LV pool, the sectors' interior pixels) are masks or padded index
lists of fixed size, medians and quantiles are numpy's (linear interpolation) taken from a sort
with the pixels outside the set placed last, and everything is float32 with matrix products at
the highest precision (not the reduced precision some accelerators use for float32 products by
default). Results agree with the numpy rules to float32's precision
(tests/test_batched_curves.py). On a CPU the sorts make it slower than the numpy rules, so
`perfusion.mbf_from_slices` uses it by default only on an accelerator.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from perfjax import conventions
from perfjax import frame_gain as gain_lib
from perfjax.bolus import check_curve
from perfjax.errors import InputError
from perfjax.extraction import (AIF_PURITY, MIN_POOL_NEIGHBOURS, OWN_FLOOR, POOL_NOT_FINITE,
                                amplification_at_peak, conversion_table)

MAX_CHUNK = 128  # slices per call; chunks are padded to a power of two (one compile each)
CHUNK_ELEMENTS = 2 ** 26  # at most this many pixel-frames a call (fewer slices when larger)
_HIGHEST = jax.lax.Precision.HIGHEST
_NB = gain_lib.N_BASELINE


def _interpolate(n, q, order_statistic):
  """numpy's linear quantile ``q`` of ``n`` values from ``order_statistic(k)``, the k-th
  smallest (0-based) of each row; NaN where n is 0."""
  pos = q * jnp.maximum(n - 1, 0).astype(jnp.float32)
  lo = jnp.floor(pos).astype(jnp.int32)
  below = order_statistic(lo)
  above = order_statistic(jnp.minimum(lo + 1, jnp.maximum(n - 1, 0)))
  return jnp.where(n > 0, below + (above - below) * (pos - lo), jnp.nan)


def masked_quantile(x, valid, q: float):
  """numpy's linear quantile ``q`` along the last axis over the entries where ``valid``
  (broadcast to ``x``); NaN where none is valid."""
  valid = jnp.broadcast_to(valid, x.shape)
  ordered = jnp.sort(jnp.where(valid, x, jnp.inf), axis=-1)
  return _interpolate(valid.sum(-1), q, lambda k: jnp.take_along_axis(
      ordered, k[..., None], -1)[..., 0])


def sort_once(x):
  """``x`` sorted along its last axis, and the permutation that sorts it: for
  :func:`quantile_of_sorted` over several subsets of the same values."""
  order = jnp.argsort(x, axis=-1)
  return jnp.take_along_axis(x, order, -1), order


def quantile_of_sorted(ordered, order, valid, q: float):
  """:func:`masked_quantile` of the values that :func:`sort_once` sorted, over ``valid``
  (broadcast to them, in their original order): one sort serves every subset."""
  in_order = jnp.take_along_axis(jnp.broadcast_to(valid, ordered.shape), order, -1)
  seen = jnp.cumsum(in_order, -1)  # the k-th valid entry's index: how many have seen <= k
  return _interpolate(seen[..., -1], q, lambda k: jnp.take_along_axis(
      ordered, jnp.minimum(jnp.sum(seen <= k[..., None], -1), ordered.shape[-1] - 1)[..., None],
      -1)[..., 0])


def _masked_mean(x, valid, axis):
  return jnp.where(valid, x, 0.0).sum(axis) / valid.sum(axis)


def _baseline_frames(curve, foot_frac: float = 0.1):
  """`bolus.foot_and_peak` and `bolus.baseline_frames` of one curve [T]: (b, peak)."""
  enh = curve - jnp.median(curve[:3])
  peak = jnp.argmax(enh)
  idx = jnp.arange(curve.shape[0])
  below = (idx <= peak) & (enh <= foot_frac * enh[peak])
  return jnp.maximum(jnp.max(jnp.where(below, idx, 0)), 1), peak


def _neighbour_sum(values_pc, hw):
  """`neighbours.neighbour_sum` of pixels [P, C] (P = H x W, row-major)."""
  h, w = hw
  padded = jnp.pad(values_pc.reshape(h, w, -1), ((1, 1), (1, 1), (0, 0)))
  return sum(padded[1 + dr:1 + dr + h, 1 + dc:1 + dc + w]
             for dr in (-1, 0, 1) for dc in (-1, 0, 1) if dr or dc).reshape(h * w, -1)


# ----------------------------------------------------------------------------- frame gain
def _gain_measurements(raw, outside, lv_full, proj, hw):
  """`frame_gain.frame_gain`'s measurements of one slice [P, T] (P = H x W): the log gain [T],
  the region, body and flat pixel counts, the LV blood pool's mean curve [T] and the noise of
  the log gain."""
  finite = jnp.all(jnp.isfinite(raw), -1)
  base = jnp.where(finite, raw[:, :_NB].mean(-1), 0.0)
  region = outside & finite
  bright = region & (base > gain_lib.BODY_LEVEL * masked_quantile(base, region, 0.9))
  bright_f = bright[:, None].astype(raw.dtype)
  n_bright = _neighbour_sum(bright_f, hw)  # [P, 1]: each pixel's body neighbours
  body = bright & (n_bright[:, 0] >= gain_lib.MIN_BODY_NEIGHBOURS)
  log_px = jnp.log(jnp.maximum(jnp.where(bright[:, None], raw, 1.0), 1e-12))
  log_rel = log_px - log_px[:, :_NB].mean(-1, keepdims=True)
  rough = jnp.eye(proj.shape[0], dtype=proj.dtype) - proj
  median_rough = masked_quantile(jnp.matmul(log_px, rough.T, precision=_HIGHEST).T, body, 0.5)
  log_g = jnp.zeros_like(median_rough)
  for _ in range(gain_lib.N_ROUNDS):
    log_g = log_g + median_rough - jnp.matmul(log_g, rough.T, precision=_HIGHEST)
  # The trend of each pixel's body neighbours (neighbours.neighbour_mean), about the first frames;
  # of the curves relative to their first frames, small numbers that float32 keeps to the last
  # digits that choose the flattest pixels.
  trend = (_neighbour_sum(jnp.matmul(log_rel, proj.T, precision=_HIGHEST) * bright_f, hw)
           / jnp.maximum(n_bright, 1.0))
  trend = trend - trend[:, :_NB].mean(-1, keepdims=True)
  flat = body
  rel_sorted, rel_order = sort_once(log_rel.T)  # [T, P]: each round takes another subset's median
  for _ in range(gain_lib.N_ROUNDS):
    shift = jnp.matmul(log_g, proj.T, precision=_HIGHEST)
    excursion = jnp.abs(trend - (shift - shift[:_NB].mean())).max(-1)
    flat = body & (excursion <= masked_quantile(excursion, body, gain_lib.FLAT_FRACTION))
    log_g = quantile_of_sorted(rel_sorted, rel_order, flat, 0.5)
  even = jnp.cumsum(body) % 2 == 1  # alternate body pixels, in frame_gain's order
  halves = [quantile_of_sorted(rel_sorted, rel_order, flat & h, 0.5) for h in (even, ~even)]
  noise = jnp.std(halves[0] - halves[1]) / 2.0  # frame_gain.median_noise
  lv_ok = lv_full.any() & jnp.all(jnp.where(lv_full[:, None], jnp.isfinite(raw), True))
  lv = jnp.where(lv_ok, _masked_mean(raw, lv_full[:, None], 0), jnp.nan)
  return log_g, region.sum(), body.sum(), flat.sum(), lv, noise


@functools.partial(jax.jit, static_argnames="hw")
def _gains(raw_npt, outside_np, lv_np, proj_ntt, hw):
  return jax.vmap(functools.partial(_gain_measurements, hw=hw))(raw_npt, outside_np, lv_np,
                                                                  proj_ntt)


# ----------------------------------------------------------------------------- curves
def _to_concentration(signal, base, s_tab, c_tab):
  """`extraction._convert` of rows [R, T] with pre-contrast levels [R]: odd reflection about
  the baseline, NaN rows where a signal is not finite or the baseline not positive."""
  good = jnp.all(jnp.isfinite(signal), -1) & (base > 0)
  s0 = jnp.where(good, base, 1.0)[:, None]
  up = signal >= s0
  conc = jnp.interp(jnp.where(up, signal, 2.0 * s0 - signal) / s0 * s_tab[0], s_tab, c_tab)
  return jnp.where(good[:, None], jnp.where(up, conc, -conc), jnp.nan)


def _purity(c, ok, pool_idx, hw):
  """`extraction.blood_purity` of a pool's rows [Q, T] where ``ok`` (the pool's pixels, at
  ``pool_idx`` of the H x W grid ``hw``), judged by their pool neighbours."""
  finite = ok[:, None] & jnp.isfinite(c)
  curve = _masked_mean(c, finite, 0)
  foot_b, peak = _baseline_frames(curve)
  first = jnp.arange(c.shape[1]) < foot_b
  enh = c[:, peak] - _masked_mean(c, first[None, :], 1)
  valid = ok & jnp.isfinite(enh)
  ref = masked_quantile(enh, valid, 0.9)
  own = jnp.where(jnp.isnan(enh), -jnp.inf, enh)
  pairs = jnp.stack([valid.astype(c.dtype), jnp.where(valid, enh, 0.0)], -1)  # [Q, 2]
  grid = jnp.zeros((hw[0] * hw[1], 2), c.dtype).at[pool_idx].add(pairs)
  count, total = _neighbour_sum(grid, hw)[pool_idx].T
  near = total / jnp.maximum(count, 1.0)
  judged = ok & (count >= MIN_POOL_NEIGHBOURS)
  by_neighbours = judged.sum() >= 4
  bar = jnp.where(by_neighbours, masked_quantile(near, judged, 0.9), ref)
  keep = jnp.where(by_neighbours, judged & (near >= AIF_PURITY * bar) & (own >= OWN_FLOOR * ref),
                   ok & (own >= AIF_PURITY * ref))
  use = (ok.sum() >= 4) & jnp.all(jnp.isfinite(curve)) & (keep.sum() >= 4) & (ref > 0) & (
      bar > 0)
  return jnp.where(use, keep, ok)


def _slice_curves(raw, gain, pool_idx, pool_ok, tissue, s_blood, c_blood, s_myo, c_myo, *,
                  convert: bool, n_sec: int, hw):
  """`extraction.curves_per_sequence` of one slice [P, T] divided by its gain [T], for each
  variant's tables [V, L] (unused without ``convert``)."""
  x = raw / gain
  pool = x[pool_idx]
  ok = pool_ok
  pool_finite = jnp.all(jnp.where(ok[:, None], jnp.isfinite(pool), True))
  pool = jnp.where(ok[:, None], pool, 1.0)
  b, _ = _baseline_frames(_masked_mean(pool, ok[:, None], 0))
  first = jnp.arange(x.shape[1]) < b
  sigma2 = 0.0
  if convert:  # the Rician floor (extraction: rician defaults to converting)
    mean_b = _masked_mean(pool, first[None, :], 1)
    var = jnp.where(first, (pool - mean_b[:, None]) ** 2, 0.0).sum(1) / jnp.maximum(b - 1, 1)
    sigma2 = jnp.where(b >= 2, jnp.nan_to_num(masked_quantile(var, ok, 0.5)), 0.0)
  def floor(v):
    return jnp.where(sigma2 > 0, jnp.sqrt(jnp.maximum(v ** 2 - sigma2, 0.0)), v)

  pool_signal = floor(pool) if convert else pool
  # Sector sums as a product with the one-hot sector map: unlike a scatter-add (atomic on a
  # GPU), its order of summation, and so its result, is the same in every run.
  # A non-finite pixel makes its own sector's curve NaN, as in the numpy rules.
  one_hot = (tissue[:, None] == jnp.arange(1, n_sec + 1)).astype(x.dtype)  # [P, K]
  finite = jnp.isfinite(x)
  sums = jnp.matmul(one_hot.T, jnp.where(finite, x, 0.0), precision=_HIGHEST)
  broken = jnp.matmul(one_hot.T, (~finite).astype(x.dtype), precision=_HIGHEST) > 0
  sector = floor(jnp.where(broken, jnp.nan, sums) / one_hot.sum(0)[:, None])
  base_of = lambda rows: _masked_mean(rows, first[None, :], 1)  # noqa: E731
  aifs, curves, blood, blood_px, n_pure = [], [], None, None, None
  for v in range(s_blood.shape[0] if convert else 1):
    px = _to_concentration(pool_signal, base_of(pool_signal), s_blood[v], c_blood[v]) \
        if convert else pool
    pure = _purity(px, ok, pool_idx, hw)
    aif = _masked_mean(px, pure[:, None] & jnp.isfinite(px), 0)
    aif = aif if convert else floor(aif)
    cur = _to_concentration(sector, base_of(sector), s_myo[v], c_myo[v]) if convert else sector
    aifs.append(aif - _masked_mean(aif, first, 0))
    curves.append(cur - base_of(cur)[:, None])
    if v == 0:
      blood = floor(_masked_mean(pool, pure[:, None], 0))
      blood = blood - _masked_mean(blood, first, 0)
      blood_px, n_pure = _masked_mean(pool_signal, pure[:, None], 0), pure.sum()
  return dict(aif=jnp.stack(aifs), curves=jnp.stack(curves), blood=blood, blood_px=blood_px,
              n_pure=n_pure, n_baseline=b, pool_finite=pool_finite)


@functools.partial(jax.jit, static_argnames=("convert", "n_sec", "hw"))
def _curves(raw_npt, gain_nt, pool_idx, pool_ok, tissue_np, s_blood, c_blood, s_myo, c_myo, *,
            convert: bool, n_sec: int, hw):
  return jax.vmap(functools.partial(_slice_curves, convert=convert, n_sec=n_sec, hw=hw))(
      raw_npt, gain_nt, pool_idx, pool_ok, tissue_np, s_blood, c_blood, s_myo, c_myo)


# ----------------------------------------------------------------------------- host side
def _tables(sequences: list) -> list[np.ndarray]:
  """The conversions' 1-D tables: for blood, then myocardium, each variant's (signal,
  concentration) pair, flat ([2 x V x 2] arrays of their own lengths)."""
  return [np.asarray(a, np.float32) for tissue in ("blood", "myo") for s in sequences
          for a in conversion_table(s, tissue)]


def curves_of_slices(raw, masks, times, geometries: list, sequences: list, *,
                     frame_gain: bool) -> list[tuple]:
  """What `perfusion.mbf_from_slices` takes from each slice, in batched calls on the default
  device: per slice (frame gain dict or None, the variants' dicts (aif, curves,
  aif_amplification, blood_signal, counts, n_aif_pixels) or None, error message or "").

  ``geometries``: per slice `extraction.curve_geometry`'s dict, or the error message that kept
  it from being made; ``sequences``: per slice the list of its variants' sequence dicts (all
  None: signal, not concentration). Slices are processed in chunks of at most MAX_CHUNK, fewer
  (a power of two) where their pixel-frames would pass CHUNK_ELEMENTS, so that larger images
  take fewer slices a call.
  """
  n, h, w, t = raw.shape
  fits = max(CHUNK_ELEMENTS // (h * w * t), 1)
  chunk = min(MAX_CHUNK, 1 << (fits.bit_length() - 1))
  out = []
  for start in range(0, n, chunk):
    rows = list(range(start, min(start + chunk, n)))
    out += _chunk(raw, masks, times, geometries, sequences, rows, frame_gain, (h * w, t))
  return out


def _chunk(raw, masks, times, geometries, sequences, rows, frame_gain, shape):
  """:func:`curves_of_slices` for the consecutive slices ``rows``, padded to a power of two with
  copies of the first."""
  p, t = shape
  size = 1 << (len(rows) - 1).bit_length()  # padded: one compile per power of two

  def padded(a):  # [len(rows), ...] -> [size, ...], with copies of the first row
    return np.concatenate([a, np.repeat(a[:1], size - len(rows), axis=0)])

  # The rows are consecutive: their slice of ``raw`` goes to the device as it is (no host copy
  # when it is float32) and the padding is copied there.
  raw_d = jnp.asarray(np.asarray(raw[rows[0]:rows[-1] + 1], np.float32).reshape(-1, p, t))
  if size > len(rows):
    raw_d = jnp.concatenate([raw_d, jnp.broadcast_to(raw_d[:1], (size - len(rows), p, t))])
  results = [dict(fg=None) for _ in rows]
  gain = np.ones((size, t), np.float32)
  if frame_gain:
    if t <= gain_lib.TREND_ORDER + _NB:
      for r in results:
        r["fg"] = gain_lib.verdict(t)
    else:
      outside = np.stack([~ndimage.binary_dilation(masks[i] > 0,
                                                   iterations=gain_lib.HEART_MARGIN_PX).ravel()
                          for i in rows])
      lv_full = np.stack([(masks[i] == conventions.LV_BLOOD_POOL).ravel() for i in rows])
      projs = np.stack([gain_lib.trend_projection(np.asarray(times[i], np.float64))
                        for i in rows])
      log_g, n_region, n_body, n_flat, lv, noise = (np.asarray(a, np.float64) for a in _gains(
          raw_d, jnp.asarray(padded(outside)), jnp.asarray(padded(lv_full)),
          jnp.asarray(padded(projs), jnp.float32), hw=tuple(masks[rows[0]].shape)))
      for k, r in enumerate(results):
        times_k = np.asarray(times[rows[k]], np.float64)
        z = gain_lib.uptake_z(log_g[k], lv[k], times_k, projs[k])
        myo = np.asarray(raw[rows[k]], np.float64)[masks[rows[k]] == conventions.MYOCARDIUM]
        r["fg"] = gain_lib.verdict(t, int(n_region[k]), int(n_body[k]), int(n_flat[k]), z,
                                   log_g[k], lv[k], times_k, float(noise[k]),
                                   gain_lib.heart_rough(myo))  # few pixels: on the host
        gain[k] = r["fg"]["gain"]
  good = [k for k, i in enumerate(rows) if isinstance(geometries[i], dict)]
  for k, i in enumerate(rows):
    if k not in good:
      results[k]["error"] = geometries[i]
  if good:
    _curves_into(results, raw_d, gain, [rows[k] for k in good], good, geometries, sequences,
                 size, p)
  return [(r["fg"], r.get("variants"), r.get("error", "")) for r in results]


def _curves_into(results, raw_d, gain, slices, slots, geometries, sequences, size, p):
  """Fill ``results[slot]`` with the variants of each slice whose geometry was made."""
  n_sec = geometries[slices[0]]["n_sec"]
  pool_lists = [np.flatnonzero(geometries[i]["lv"].ravel()) for i in slices]
  width = -(-max(len(q) for q in pool_lists) // 64) * 64  # rounded: fewer shapes to compile
  pool_idx = np.zeros((size, width), np.int32)
  pool_ok = np.zeros((size, width), bool)
  tissue = np.zeros((size, p), np.int32)
  for k, i, q in zip(slots, slices, pool_lists):
    pool_idx[k, :len(q)], pool_ok[k, :len(q)] = q, True
    tissue[k] = geometries[i]["tissue_map"].ravel()
  convert = sequences[slices[0]][0] is not None
  n_v = len(sequences[slices[0]])
  if convert:
    tabs = {}
    for k, i in zip(slots, slices):
      try:
        tabs[k] = _tables(sequences[i])
      except InputError as e:
        results[k]["error"] = str(e)
    if not tabs:
      return
    # [size, 4, V, L]: each table padded with its last entry to a common length (rounded: fewer
    # shapes to compile); slots without tables get zeros (their results are not read).
    width_l = -(-max(len(a) for tab in tabs.values() for a in tab) // 512) * 512
    stacked = np.zeros((size, 2, n_v, 2, width_l), np.float32)  # slot, tissue, variant, s/c
    for k, tab in tabs.items():
      stacked[k] = np.stack([np.pad(a, (0, width_l - len(a)), mode="edge")
                             for a in tab]).reshape(2, n_v, 2, width_l)
    s_blood, c_blood, s_myo, c_myo = (jnp.asarray(stacked[:, t, :, j])
                                      for t in range(2) for j in range(2))
  else:
    s_blood = c_blood = s_myo = c_myo = jnp.zeros((size, 1, 2), jnp.float32)
  res = _curves(raw_d, jnp.asarray(gain), jnp.asarray(pool_idx), jnp.asarray(pool_ok),
                jnp.asarray(tissue), s_blood, c_blood, s_myo, c_myo, convert=convert,
                n_sec=n_sec, hw=tuple(geometries[slices[0]]["lv"].shape))
  res = {k: np.asarray(v, np.float64) for k, v in res.items()}
  for k, i in zip(slots, slices):
    if "error" in results[k]:
      continue
    if not res["pool_finite"][k]:
      results[k]["error"] = str(InputError("raw", POOL_NOT_FINITE))
      continue
    try:  # the numpy rules' first-pass window needs a finite AIF
      for v in range(n_v):
        check_curve(res["aif"][k, v], "aif")
    except InputError as e:
      results[k]["error"] = str(e)
      continue
    b = int(res["n_baseline"][k])
    amp = float("nan")
    if convert:
      blood_px = res["blood_px"][k]
      amp = amplification_at_peak(res["aif"][k, 0], blood_px, float(blood_px[:b].mean()),
                                  sequences[i][0])
    results[k]["variants"] = [
        dict(aif=res["aif"][k, v], curves=res["curves"][k, v],
             counts=geometries[i]["counts"], n_aif_pixels=int(res["n_pure"][k]),
             aif_amplification=amp, blood_signal=res["blood"][k]) for v in range(n_v)]
