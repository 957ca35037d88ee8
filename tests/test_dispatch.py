"""Device-aware dispatch without a GPU (flashcupy._device, flashcupy._configs, flashcupy._dispatch):
every chooser respects the device's shared-memory budget; sm_75 runs the chunked path; the 99 KB
class (and FLASHCUPY_SMEM_LIMIT_KB=99) gets a fused config or an explicit chunked fallback for every
problem; A100 / H100 / H200 get exactly the configurations measured before devices were considered."""

import dataclasses

import numpy as np
import pytest

from flashcupy import _configs, _device, _dispatch, _gpu_sm90, _gpu_sm90_bwd, interface
from flashcupy._arrays import bfloat16
from flashcupy._device import DeviceInfo

F16, F32, F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)
BF16 = bfloat16()
DTYPES = [F16, F32, F64] + ([np.dtype(BF16)] if BF16 is not None else [])
HEAD_DIMS = sorted({*_configs.HEAD_DIM_BUCKETS, 8, 40, 72, 100, 136, 200, 248, 264})
SPARSE = (None, (64, 64), (128, 128), (64, 128), (128, 64), (256, 64))
KB99 = 101376

DEVICES = {cc: DeviceInfo.for_cc(cc) for cc in (75, 80, 86, 87, 89, 90, 100, 120)}
CAPPED = {f"sm_{cc} capped at 99 KB": DeviceInfo.for_cc(cc).capped(KB99) for cc in (80, 90)}
ODD = {"sm_80 capped at 48 KB": DeviceInfo.for_cc(80).capped(48 * 1024),
       "sm_90 capped at 64 KB": DeviceInfo.for_cc(90).capped(64 * 1024)}
ALL = {**{f"sm_{cc}": d for cc, d in DEVICES.items()}, **CAPPED, **ODD}


def _problems():
    for dtype in DTYPES:
        for head_dim in HEAD_DIMS:
            for causal in (False, True):
                for dropout in (False, True):
                    for sparse in SPARSE:
                        for tf32 in (False, True):
                            yield dtype, head_dim, causal, dropout, sparse, tf32


def _plans(device):
    for dtype, hd, causal, dropout, sparse, tf32 in _problems():
        kw = dict(dropout=dropout, sparse_blocks=sparse, allow_tf32=tf32)
        yield (dtype, hd, causal, dropout, sparse, tf32), (_dispatch.forward_plan(dtype, hd, causal, device, **kw),
                                                           _dispatch.backward_plan(dtype, hd, causal, device, **kw))


# ------------------------------------------------------------------------------------------ devices

def test_known_budgets():
    assert DeviceInfo.for_cc(75).smem_optin == 64 * 1024
    for cc in (80, 87):
        assert DeviceInfo.for_cc(cc).smem_optin == 166912
    for cc in (86, 89, 120):
        assert DeviceInfo.for_cc(cc).smem_optin == KB99
    assert DeviceInfo.for_cc(90).smem_optin == 232448
    assert _device.as_device(86) == DeviceInfo.for_cc(86)
    d = DeviceInfo(90, 232448, 132, "NVIDIA H200")
    assert _device.as_device(d) is d and dataclasses.is_dataclass(d)
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.cc = 80
    for bad in ("90", 9.0, None, True):
        with pytest.raises(TypeError, match="device"):
            _device.as_device(bad)


def test_overrides(monkeypatch):
    h200 = DeviceInfo(90, 232448, 132, "NVIDIA H200")
    monkeypatch.delenv("FLASHCUPY_SMEM_LIMIT_KB", raising=False)
    monkeypatch.delenv("FLASHCUPY_FORCE_CC", raising=False)
    assert _device.with_overrides(h200) == h200
    monkeypatch.setenv("FLASHCUPY_SMEM_LIMIT_KB", "99")
    assert _device.with_overrides(h200) == dataclasses.replace(h200, smem_optin=KB99)
    monkeypatch.setenv("FLASHCUPY_SMEM_LIMIT_KB", "300")  # a cap never raises the budget
    assert _device.with_overrides(h200) == h200
    monkeypatch.setattr(_device, "SMEM_LIMIT_KB", 64)  # module setting; the smaller cap wins
    assert _device.with_overrides(h200).smem_optin == 64 * 1024
    monkeypatch.setattr(_device, "SMEM_LIMIT_KB", None)
    monkeypatch.delenv("FLASHCUPY_SMEM_LIMIT_KB")
    monkeypatch.setenv("FLASHCUPY_FORCE_CC", "75")
    assert _device.with_overrides(h200) == DeviceInfo(75, 65536, 132, "NVIDIA H200")
    monkeypatch.setenv("FLASHCUPY_FORCE_CC", "86")
    assert _device.with_overrides(h200).smem_optin == KB99
    for bad in ("x", "0", "-5"):
        monkeypatch.setenv("FLASHCUPY_FORCE_CC", bad)
        with pytest.raises(ValueError, match="FLASHCUPY_FORCE_CC"):
            _device.with_overrides(h200)
    monkeypatch.setenv("FLASHCUPY_FORCE_CC", "100")  # above the real device: its kernels could not build
    with pytest.raises(ValueError, match="FLASHCUPY_FORCE_CC.*90.*NVIDIA H200"):
        _device.with_overrides(h200)
    monkeypatch.delenv("FLASHCUPY_FORCE_CC")
    for bad in (0, -1, 99.5, "99", True):
        monkeypatch.setattr(_device, "SMEM_LIMIT_KB", bad)
        with pytest.raises(ValueError, match="SMEM_LIMIT_KB"):
            _device.with_overrides(h200)


def test_device_info_is_queried_once_and_overridden_at_each_call(monkeypatch):
    calls = []

    def fake_query(device_id):
        calls.append(device_id)
        return DeviceInfo(90, 232448, 132, f"GPU {device_id}")

    monkeypatch.setattr(_device, "_query", fake_query)
    monkeypatch.delenv("FLASHCUPY_FORCE_CC", raising=False)
    monkeypatch.setenv("FLASHCUPY_SMEM_LIMIT_KB", "99")
    assert _device.device_info(1) == DeviceInfo(90, KB99, 132, "GPU 1")
    monkeypatch.delenv("FLASHCUPY_SMEM_LIMIT_KB")
    assert _device.device_info(1).smem_optin == 232448
    assert calls == [1, 1]  # the real _query is an lru_cache; the overrides are not cached


# ------------------------------------------------------------------------------------------ budgets

@pytest.mark.parametrize("name", sorted(ALL))
def test_every_plan_fits_the_device(name):
    device = ALL[name]
    for problem, plans in _plans(device):
        for plan in plans:
            if plan is not None:
                assert plan.family in _dispatch.FAMILIES
                assert plan.config.max_smem_bytes <= device.smem_optin, (name, problem, plan)
                assert device.cc >= 80


@pytest.mark.parametrize("name", sorted(ALL))
def test_every_chooser_fits_the_device(name):
    device = ALL[name]
    for bucket in _configs.HEAD_DIM_BUCKETS:
        cfgs = [_configs.fwd_config(bucket, F16, False, device, s) for s in SPARSE]
        cfgs += [_configs.bwd_config(bucket, F16, False, device, s) for s in SPARSE]
        cfgs += [_configs.dmma_fwd_config(bucket, False, device), _configs.dmma_bwd_config(bucket, False, device),
                 _configs.tf32_fwd_config(bucket, False, device), _configs.tf32_bwd_config(bucket, False, device),
                 _configs.simt_fwd_config(bucket, F32, False, device), _configs.simt_bwd_config(bucket, F32, False, device)]
        if bucket > 160:
            cfgs.append(_configs.simt_bwd_config(bucket, F64, False, device))
        for cfg in cfgs:
            assert cfg is None or cfg.max_smem_bytes <= device.smem_optin, (name, cfg)
            assert cfg is None or device.cc >= 80


def test_sm75_runs_the_chunked_path():
    for device in (DEVICES[75], DeviceInfo.for_cc(70), DeviceInfo(75, 232448, 40, "pretend")):
        for problem, plans in _plans(device):
            assert plans == (None, None), problem
        assert _dispatch.path_name(_dispatch.forward_plan(F16, 64, False, device)) == "chunked path on the GPU"
        assert _configs.fwd_config(64, F16, False, device) is None
        assert _configs.float_fwd_config(64, F64, False, device) is None
        assert _configs.float_bwd_config(64, F32, False, device, True) is None


# Under 99 KB every problem a fused family serves today gets a fused kernel, except these, which
# run the chunked path explicitly: float64 backward at head_dim > 224 (DFMA 8x16 tiles need 99.4 KB).
CHUNKED_AT_99KB = {(F64, "bwd", 256)}


@pytest.mark.parametrize("device", [DEVICES[86], DEVICES[89], DEVICES[120], *CAPPED.values()],
                         ids=["sm_86", "sm_89", "sm_120", *CAPPED])
def test_99kb_class_gets_fused_or_explicit_chunked(device):
    big = DEVICES[90]
    for (dtype, hd, causal, dropout, sparse, tf32), plans in _plans(device):
        kw = dict(dropout=dropout, sparse_blocks=sparse, allow_tf32=tf32)
        today = (_dispatch.forward_plan(dtype, hd, causal, big, **kw), _dispatch.backward_plan(dtype, hd, causal, big, **kw))
        for direction, plan, ref in zip(("fwd", "bwd"), plans, today):
            if ref is None:  # chunked on the H200 as well
                assert plan is None
                continue
            bucket = _configs.head_dim_bucket(hd)
            if (dtype, direction, bucket) in CHUNKED_AT_99KB:
                assert plan is None, (dtype, direction, hd)
            else:
                assert plan is not None, (dtype, direction, hd, causal, dropout, sparse, tf32)
                assert (plan.family == ref.family or (ref.family == _dispatch.DMMA and plan.family == _dispatch.SIMT)
                        or (ref.family == _dispatch.WGMMA and plan.family == _dispatch.MMA16))  # wgmma: sm_90 only


def test_99kb_configs_exist_where_the_h200_ones_do_not_fit():
    """The 99 KB class runs other tiles exactly where the H200's exceed 99 KB (review §4's list)."""
    sm86, sm90 = DEVICES[86], DEVICES[90]
    changed = set()
    for bucket in _configs.HEAD_DIM_BUCKETS:
        pairs = {"fp16 fwd": (_configs.fwd_config(bucket, F16, False, sm90), _configs.fwd_config(bucket, F16, False, sm86)),
                 "fp16 bwd": (_configs.bwd_config(bucket, F16, False, sm90), _configs.bwd_config(bucket, F16, False, sm86)),
                 "fp32 fwd": (_configs.float_fwd_config(bucket, F32, False, sm90), _configs.float_fwd_config(bucket, F32, False, sm86)),
                 "fp32 bwd": (_configs.float_bwd_config(bucket, F32, False, sm90), _configs.float_bwd_config(bucket, F32, False, sm86)),
                 "tf32 fwd": (_configs.float_fwd_config(bucket, F32, False, sm90, True), _configs.float_fwd_config(bucket, F32, False, sm86, True)),
                 "tf32 bwd": (_configs.float_bwd_config(bucket, F32, False, sm90, True), _configs.float_bwd_config(bucket, F32, False, sm86, True)),
                 "fp64 fwd": (_configs.float_fwd_config(bucket, F64, False, sm90), _configs.float_fwd_config(bucket, F64, False, sm86)),
                 "fp64 bwd": (_configs.float_bwd_config(bucket, F64, False, sm90), _configs.float_bwd_config(bucket, F64, False, sm86))}
        for what, (h200, rtx) in pairs.items():
            fits = h200.max_smem_bytes <= KB99
            if fits and what.startswith("fp64"):  # katom differs (m16n8k16 on sm_90 only)
                h200 = dataclasses.replace(h200, **{f: 4 for f in ("katom", "kv_katom", "dq_katom") if hasattr(h200, f)})
            assert (h200 == rtx) == fits, (what, bucket, h200, rtx)
            if not fits:
                changed.add((what, bucket))
    assert changed == {("fp16 fwd", b) for b in (192, 224, 256)} | {("fp16 bwd", b) for b in (96, 128, 160, 192, 224, 256)} \
        | {("fp32 fwd", 160), ("fp32 fwd", 256), ("fp32 bwd", 64), ("fp32 bwd", 224), ("fp32 bwd", 256)} \
        | {("tf32 fwd", b) for b in (128, 224, 256)} | {("tf32 bwd", b) for b in (160, 192, 224, 256)} \
        | {("fp64 fwd", b) for b in (160, 192, 224, 256)} | {("fp64 bwd", b) for b in (96, 160, 192, 224, 256)}


def test_sparse_tiles_divide_the_mask_blocks():
    """TileWalk needs power-of-two tiles no larger than the mask block along the walked dimension, and
    a CTA's own tile inside one block (flash_common.cuh)."""
    pow2 = lambda x: x & (x - 1) == 0  # noqa: E731
    for device in ALL.values():
        for bucket in _configs.HEAD_DIM_BUCKETS:
            for sparse in SPARSE[1:]:
                bq, bk = sparse
                f = _configs.fwd_config(bucket, F16, True, device, sparse)
                b = _configs.bwd_config(bucket, F16, True, device, sparse)
                if f is not None:
                    assert bq % f.block_m == 0 and bk % f.block_n == 0 and pow2(f.block_n), (device, f)
                if b is not None:
                    assert bk % b.block_n == 0 and bq % b.block_m == 0 and pow2(b.block_m), (device, b)
                    assert bq % b.dq_block_m == 0 and bk % b.dq_block_n == 0 and pow2(b.dq_block_n), (device, b)


# ------------------------------------------------------------------------------------------ routing

def _today(dtype, head_dim, dropout, sparse, tf32, cc=80, direction="fwd"):
    """interface.kernel_path before devices were considered (sm_80+), as a path name; plus the Hopper
    forward and backward (fp16/bf16, head_dim <= 128, no dropout, no block mask, on sm_90)."""
    if head_dim > 256:
        return "chunked path on the GPU"
    if dtype in (F16, np.dtype(BF16) if BF16 is not None else F16):
        if cc == 90 and head_dim <= 128 and not dropout and sparse is None:
            return "fused fp16/bf16 (Hopper wgmma + TMA)"
        return "fused fp16/bf16 (tensor cores)"
    if dtype in (F32, F64) and not dropout and sparse is None:
        if dtype == F64:
            return "fused fp64 (FP64 tensor cores)"
        return "fused fp32 (TF32 tensor cores)" if tf32 else "fused fp32/fp64 (CUDA cores)"
    return "chunked path on the GPU"


@pytest.mark.parametrize("cc", [80, 90])
def test_routing_matches_today(cc):
    device = DEVICES[cc]
    for (dtype, hd, causal, dropout, sparse, tf32), (fwd, bwd) in _plans(device):
        assert _dispatch.path_name(fwd) == _today(dtype, hd, dropout, sparse, tf32, cc), (dtype, hd, dropout, sparse, tf32)
        if dtype not in (F32, F64):
            assert _dispatch.path_name(bwd) == _today(dtype, hd, dropout, sparse, tf32, cc, "bwd")
        if fwd is None:
            assert bwd is None
        elif fwd.family == _dispatch.WGMMA:  # the Hopper backward covers what the Hopper forward does
            assert bwd.family == _dispatch.WGMMA
        elif dtype == F64 and _configs.head_dim_bucket(hd) > 160:  # no DMMA backward there: DFMA
            assert bwd.family == _dispatch.SIMT and bwd.config.elem == "double"
        else:
            assert bwd.family == fwd.family
    assert _dispatch.path_name(None) == "chunked path on the GPU"
    assert _dispatch.forward_plan(np.int32, 64, False, device) is None


GOLDEN_FWD16 = {  # bucket: (dense, block-sparse 64x64), the same on sm_80 and sm_90
    32: ('FwdConfig(32, 128, 64, 4)', 'FwdConfig(32, 64, 64, 4)'),
    64: ('FwdConfig(64, 128, 64, 4)', 'FwdConfig(64, 64, 64, 4)'),
    96: ('FwdConfig(96, 128, 64, 4)', 'FwdConfig(96, 64, 64, 4)'),
    128: ('FwdConfig(128, 128, 32, 4)', 'FwdConfig(128, 64, 32, 4)'),
    160: ('FwdConfig(160, 128, 64, 8)', 'FwdConfig(160, 64, 64, 4)'),
    192: ('FwdConfig(192, 128, 64, 8)', 'FwdConfig(192, 64, 64, 4)'),
    224: ('FwdConfig(224, 128, 64, 8)', 'FwdConfig(224, 64, 64, 4)'),
    256: ('FwdConfig(256, 128, 64, 8)', 'FwdConfig(256, 64, 64, 4)'),
}
GOLDEN_BWD16 = {
    32: ('BwdConfig(32, 64, 128, 1, 128, 64, False)', 'BwdConfig(32, 64, 64, 1, 64, 64, False)'),
    64: ('BwdConfig(64, 64, 128, 1, 128, 64, False)', 'BwdConfig(64, 64, 64, 1, 64, 64, False)'),
    96: ('BwdConfig(96, 64, 128, 1, 128, 64, True)', 'BwdConfig(96, 64, 64, 1, 64, 64, False)'),
    128: ('BwdConfig(128, 64, 128, 1, 128, 64, True)', 'BwdConfig(128, 64, 64, 1, 64, 64, False)'),
    160: ('BwdConfig(160, 64, 64, 2, 64, 32, True)', 'BwdConfig(160, 64, 64, 2, 64, 32, True)'),
    192: ('BwdConfig(192, 64, 64, 2, 64, 32, True)', 'BwdConfig(192, 64, 64, 2, 64, 32, True)'),
    224: ('BwdConfig(224, 32, 64, 2, 64, 32, True)', 'BwdConfig(224, 32, 64, 2, 64, 32, True)'),
    256: ('BwdConfig(256, 32, 64, 2, 64, 32, True)', 'BwdConfig(256, 32, 64, 2, 64, 32, True)'),
}
GOLDEN_FLOAT = {80: {  # bucket: fp32 fwd, bwd; TF32 fwd, bwd; fp64 fwd, bwd
    32: ("SimtFwdConfig('float', 32, 64, 64, 4, 1)", "SimtBwdConfig('float', 32, 64, 64, 4)", "DmmaFwdConfig(32, 64, 64, 4, 8, 'float')", "DmmaBwdConfig(32, 32, 64, 4, 1, 64, 64, 4, 8, 8, 2, 'float')", "DmmaFwdConfig(32, 64, 64, 4, 4, 'double')", "DmmaBwdConfig(32, 16, 64, 4, 1, 64, 32, 4, 4, 4, 2, 'double')"),
    64: ("SimtFwdConfig('float', 64, 64, 64, 4, 1)", "SimtBwdConfig('float', 64, 64, 64, 4)", "DmmaFwdConfig(64, 64, 128, 4, 8, 'float')", "DmmaBwdConfig(64, 64, 64, 4, 1, 64, 64, 4, 8, 8, 2, 'float')", "DmmaFwdConfig(64, 64, 32, 4, 4, 'double')", "DmmaBwdConfig(64, 16, 64, 4, 1, 64, 32, 4, 4, 4, 2, 'double')"),
    96: ("SimtFwdConfig('float', 96, 64, 32, 4, 1)", "SimtBwdConfig('float', 128, 32, 32, 4)", "DmmaFwdConfig(96, 64, 64, 4, 8, 'float')", "DmmaBwdConfig(96, 32, 64, 4, 1, 64, 32, 4, 8, 8, 2, 'float')", "DmmaFwdConfig(96, 64, 16, 4, 4, 'double')", "DmmaBwdConfig(96, 16, 32, 4, 1, 64, 16, 4, 4, 4, 2, 'double')"),
    128: ("SimtFwdConfig('float', 128, 64, 32, 4, 1)", "SimtBwdConfig('float', 128, 32, 32, 4)", "DmmaFwdConfig(128, 128, 64, 8, 8, 'float')", "DmmaBwdConfig(128, 32, 64, 4, 1, 64, 32, 4, 8, 8, 1, 'float')", "DmmaFwdConfig(128, 64, 16, 4, 4, 'double')", "DmmaBwdConfig(128, 16, 32, 4, 1, 32, 16, 4, 4, 4, 1, 'double')"),
    160: ("SimtFwdConfig('float', 160, 32, 64, 4, 1)", "SimtBwdConfig('float', 192, 16, 32, 4)", "DmmaFwdConfig(160, 64, 32, 4, 8, 'float')", "DmmaBwdConfig(192, 32, 64, 4, 2, 64, 32, 4, 8, 8, 1, 'float')", "DmmaFwdConfig(160, 32, 32, 4, 4, 'double')", "DmmaBwdConfig(160, 16, 32, 4, 2, 32, 16, 4, 4, 4, 2, 'double')"),
    192: ("SimtFwdConfig('float', 192, 32, 32, 4, 1)", "SimtBwdConfig('float', 192, 16, 32, 4)", "DmmaFwdConfig(192, 64, 32, 4, 8, 'float')", "DmmaBwdConfig(192, 32, 64, 4, 2, 64, 32, 4, 8, 8, 1, 'float')", "DmmaFwdConfig(192, 32, 32, 4, 4, 'double')", "SimtBwdConfig('double', 192, 16, 16, 4)"),
    224: ("SimtFwdConfig('float', 224, 32, 32, 4, 1)", "SimtBwdConfig('float', 256, 32, 32, 8)", "DmmaFwdConfig(224, 64, 32, 4, 8, 'float')", "DmmaBwdConfig(256, 32, 32, 2, 2, 32, 32, 2, 8, 8, 1, 'float')", "DmmaFwdConfig(224, 32, 16, 4, 4, 'double')", "SimtBwdConfig('double', 224, 16, 16, 4)"),
    256: ("SimtFwdConfig('float', 256, 32, 32, 4, 1)", "SimtBwdConfig('float', 256, 32, 32, 8)", "DmmaFwdConfig(256, 64, 32, 4, 8, 'float')", "DmmaBwdConfig(256, 32, 32, 2, 2, 32, 32, 2, 8, 8, 1, 'float')", "DmmaFwdConfig(256, 32, 16, 4, 4, 'double')", "SimtBwdConfig('double', 256, 16, 16, 8)"),
}, 90: {
    32: ("SimtFwdConfig('float', 32, 64, 64, 4, 1)", "SimtBwdConfig('float', 32, 64, 64, 4)", "DmmaFwdConfig(32, 64, 64, 4, 8, 'float')", "DmmaBwdConfig(32, 32, 64, 4, 1, 64, 64, 4, 8, 8, 2, 'float')", "DmmaFwdConfig(32, 64, 64, 4, 16, 'double')", "DmmaBwdConfig(32, 16, 64, 4, 1, 64, 32, 4, 16, 16, 2, 'double')"),
    64: ("SimtFwdConfig('float', 64, 64, 64, 4, 1)", "SimtBwdConfig('float', 64, 64, 64, 4)", "DmmaFwdConfig(64, 64, 128, 4, 8, 'float')", "DmmaBwdConfig(64, 64, 64, 4, 1, 64, 64, 4, 8, 8, 2, 'float')", "DmmaFwdConfig(64, 64, 32, 4, 16, 'double')", "DmmaBwdConfig(64, 16, 64, 4, 1, 64, 32, 4, 16, 16, 2, 'double')"),
    96: ("SimtFwdConfig('float', 96, 64, 32, 4, 1)", "SimtBwdConfig('float', 128, 32, 32, 4)", "DmmaFwdConfig(96, 64, 64, 4, 8, 'float')", "DmmaBwdConfig(96, 32, 64, 4, 1, 64, 32, 4, 8, 8, 2, 'float')", "DmmaFwdConfig(96, 64, 16, 4, 16, 'double')", "DmmaBwdConfig(96, 16, 32, 4, 1, 64, 16, 4, 4, 16, 2, 'double')"),
    128: ("SimtFwdConfig('float', 128, 64, 32, 4, 1)", "SimtBwdConfig('float', 128, 32, 32, 4)", "DmmaFwdConfig(128, 128, 64, 8, 8, 'float')", "DmmaBwdConfig(128, 32, 64, 4, 1, 64, 32, 4, 8, 8, 1, 'float')", "DmmaFwdConfig(128, 64, 16, 4, 16, 'double')", "DmmaBwdConfig(128, 16, 32, 4, 1, 32, 16, 4, 4, 4, 1, 'double')"),
    160: ("SimtFwdConfig('float', 160, 32, 64, 4, 1)", "SimtBwdConfig('float', 192, 16, 32, 4)", "DmmaFwdConfig(160, 64, 32, 4, 8, 'float')", "DmmaBwdConfig(192, 32, 64, 4, 2, 64, 32, 4, 8, 8, 1, 'float')", "DmmaFwdConfig(160, 32, 32, 4, 4, 'double')", "DmmaBwdConfig(160, 16, 32, 4, 2, 32, 16, 4, 4, 4, 2, 'double')"),
    192: ("SimtFwdConfig('float', 192, 32, 32, 4, 1)", "SimtBwdConfig('float', 192, 16, 32, 4)", "DmmaFwdConfig(192, 64, 32, 4, 8, 'float')", "DmmaBwdConfig(192, 32, 64, 4, 2, 64, 32, 4, 8, 8, 1, 'float')", "DmmaFwdConfig(192, 32, 32, 4, 4, 'double')", "SimtBwdConfig('double', 192, 16, 16, 4)"),
    224: ("SimtFwdConfig('float', 224, 32, 32, 4, 1)", "SimtBwdConfig('float', 256, 32, 32, 8)", "DmmaFwdConfig(224, 64, 32, 4, 8, 'float')", "DmmaBwdConfig(256, 32, 32, 2, 2, 32, 32, 2, 8, 8, 1, 'float')", "DmmaFwdConfig(224, 32, 16, 4, 4, 'double')", "SimtBwdConfig('double', 224, 16, 16, 4)"),
    256: ("SimtFwdConfig('float', 256, 32, 32, 4, 1)", "SimtBwdConfig('float', 256, 32, 32, 8)", "DmmaFwdConfig(256, 64, 32, 4, 8, 'float')", "DmmaBwdConfig(256, 32, 32, 2, 2, 32, 32, 2, 8, 8, 1, 'float')", "DmmaFwdConfig(256, 32, 16, 4, 4, 'double')", "SimtBwdConfig('double', 256, 16, 16, 8)"),
}}


def _key(cfg) -> str:
    return f"{type(cfg).__name__}{tuple(dataclasses.astuple(cfg))}"


@pytest.mark.parametrize("device", [DEVICES[80], DEVICES[90], DeviceInfo(90, 232448, 132, "NVIDIA H200"), 80, 90],
                         ids=["sm_80", "sm_90", "H200", "int 80", "int 90"])
def test_a100_h100_h200_configs_are_unchanged(device):
    """The configurations measured on the H200 (bench/NOTES.md) are exactly those of before."""
    cc = _device.as_device(device).cc
    for bucket in _configs.HEAD_DIM_BUCKETS:
        for hd in (bucket, bucket - 8):
            for causal in (False, True):
                assert (_key(_configs.fwd_config(hd, F16, causal, device)),
                        _key(_configs.fwd_config(hd, F16, causal, device, (64, 64)))) == GOLDEN_FWD16[bucket]
                assert (_key(_configs.bwd_config(hd, F16, causal, device)),
                        _key(_configs.bwd_config(hd, F16, causal, device, (64, 64)))) == GOLDEN_BWD16[bucket]
                got = []
                for dtype, tf32 in ((F32, False), (F32, True), (F64, False)):
                    got += [_key(_configs.float_fwd_config(hd, dtype, causal, device, tf32)),
                            _key(_configs.float_bwd_config(hd, dtype, causal, device, tf32))]
                assert tuple(got) == GOLDEN_FLOAT[cc][bucket], (bucket, hd)
                # float64 ignores allow_tf32
                assert _configs.float_fwd_config(hd, F64, causal, device, True) == _configs.float_fwd_config(hd, F64, causal, device)
        for sparse in ((128, 128), (128, 64), (256, 256)):  # 128-blocks: the dense tiles (block_n <= 64 divides)
            f = _configs.fwd_config(bucket, F16, False, device, sparse)
            assert f == _configs.fwd_config(bucket, F16, False, device) or sparse[0] % 128


# ------------------------------------------------------------------------------------------ item 7

def test_unrunnable_specializations_are_gone():
    assert "q_in_regs" not in {f.name for f in dataclasses.fields(_configs.FwdConfig)}
    assert _configs.FwdConfig(64, 128, 64, 4).traits("Fp16") == "FwdTraits<Fp16, 64, 128, 64, 4>"
    with pytest.raises(TypeError, match="float64"):
        _configs.simt_fwd_config(64, F64, False)
    for bucket in (32, 64, 96, 128, 160):
        with pytest.raises(ValueError, match="FP64 tensor cores"):
            _configs.simt_bwd_config(bucket, F64, False)
    assert all(c.elem == "float" for c in _configs.all_simt_fwd_specializations())
    double_bwd = {c.head_dim for c in _configs.all_simt_bwd_specializations() if c.elem == "double"}
    assert double_bwd == {192, 224, 256}
    # every SIMT config the library builds is one a chooser returns
    chosen = set(_configs.float_specializations())
    assert set(_configs.all_simt_fwd_specializations()) <= chosen
    assert set(_configs.all_simt_bwd_specializations()) <= chosen


def test_enumerators_cover_every_chooser_output():
    for arch, devices in _configs.ARCH_DEVICES.items():
        fp16 = {c for *_, c in _configs.all_fwd_specializations(devices)} | {c for *_, c in _configs.all_bwd_specializations(devices)}
        floats = set(_configs.all_simt_fwd_specializations(devices)) | set(_configs.all_simt_bwd_specializations(devices)) \
            | set(_configs.all_dmma_fwd_specializations(devices)) | set(_configs.all_dmma_bwd_specializations(devices)) \
            | set(_configs.all_tf32_fwd_specializations(devices)) | set(_configs.all_tf32_bwd_specializations(devices))
        for device in devices:
            for _, plans in _plans(device):
                for plan in plans:
                    if plan is not None:
                        if plan.family == _dispatch.WGMMA:
                            assert plan.config in {c for *_, c in _gpu_sm90.all_specializations()} \
                                | {c for *_, c in _gpu_sm90_bwd.all_specializations()}, (arch, plan)
                        else:
                            assert plan.config in (fp16 if plan.family == _dispatch.MMA16 else floats), (arch, plan)
                        assert plan.config.max_smem_bytes <= device.smem_optin


def test_path_names():
    sm90 = DEVICES[90]
    assert _dispatch.path_name(_dispatch.forward_plan(F16, 64, True, sm90, dropout=True, sparse_blocks=(64, 64))) \
        == "fused fp16/bf16 (tensor cores)"
    assert _dispatch.path_name(_dispatch.forward_plan(F32, 64, False, sm90)) == "fused fp32/fp64 (CUDA cores)"
    assert _dispatch.path_name(_dispatch.forward_plan(F32, 64, False, sm90, allow_tf32=True)) == "fused fp32 (TF32 tensor cores)"
    assert _dispatch.path_name(_dispatch.forward_plan(F64, 64, False, sm90, allow_tf32=True)) == "fused fp64 (FP64 tensor cores)"
    assert _dispatch.path_name(_dispatch.backward_plan(F64, 200, False, sm90)) == "fused fp32/fp64 (CUDA cores)"
    assert _dispatch.path_name(_dispatch.forward_plan(F32, 64, False, sm90, dropout=True)) == "chunked path on the GPU"
    assert _dispatch.path_name(_dispatch.forward_plan(F16, 264, False, sm90)) == "chunked path on the GPU"
    assert _dispatch.path_name(_dispatch.forward_plan(F16, 128, True, sm90)) == "fused fp16/bf16 (Hopper wgmma + TMA)"
    assert _dispatch.path_name(_dispatch.forward_plan(F16, 160, True, sm90)) == "fused fp16/bf16 (tensor cores)"
    assert _dispatch.path_name(_dispatch.backward_plan(F64, 256, False, DEVICES[86])) == "chunked path on the GPU"
    plan = _dispatch.forward_plan(F16, 128, False, 80)  # an int compute capability works too
    assert plan == _dispatch.Plan("mma16", _configs.fwd_config(128, F16, False, 80))
    assert _dispatch.forward_plan(F16, 128, False, 90) == _dispatch.Plan("wgmma", _gpu_sm90.config_for(128))


# ------------------------------------------------------------------------------------ interface

CHUNKED, FP16_PATH = "chunked path on the GPU", "fused fp16/bf16 (tensor cores)"


def test_kernel_path_follows_the_device():
    kp = interface.kernel_path
    for cc in (75, 70, DeviceInfo(75, 65536, 40, "Tesla T4")):
        for dtype in DTYPES:
            for backward in (False, True):
                assert kp(dtype, 64, on_gpu=True, device=cc, backward=backward) == CHUNKED
    for cc in (80, 86, 89, 90, 120, DEVICES[90].capped(KB99)):
        assert kp(F16, 256, on_gpu=True, device=cc) == FP16_PATH
        assert kp(F16, 256, on_gpu=True, device=cc, backward=True) == FP16_PATH
        assert kp(F64, 64, on_gpu=True, device=cc) == "fused fp64 (FP64 tensor cores)"
        assert kp(F64, 200, on_gpu=True, device=cc, backward=True) == "fused fp32/fp64 (CUDA cores)"
        assert kp(F32, 128, on_gpu=True, device=cc, allow_tf32=True) == "fused fp32 (TF32 tensor cores)"
        assert kp(F32, 128, on_gpu=True, device=cc, allow_tf32=True, backward=True) == "fused fp32 (TF32 tensor cores)"
    # float64 backward at head_dim > 224 on the 99 KB class: the forward fused, the backward chunked
    for cc in (86, 89, 120, DEVICES[80].capped(KB99)):
        assert kp(F64, 256, on_gpu=True, device=cc) == "fused fp64 (FP64 tensor cores)"
        assert kp(F64, 256, on_gpu=True, device=cc, backward=True) == CHUNKED
    assert kp(F64, 256, on_gpu=True, device=80, backward=True) == "fused fp32/fp64 (CUDA cores)"
    assert kp(F16, 64, on_gpu=True, device=DEVICES[90].capped(16 * 1024)) == CHUNKED  # nothing fits 16 KB
    assert kp(F16, 64, on_gpu=False, device=75) == "NumPy chunked path"
    with pytest.raises(TypeError, match="backward"):
        kp(F16, 64, on_gpu=True, device=90, backward=1)
    with pytest.raises(TypeError, match="device"):
        kp(F16, 64, on_gpu=True, device="sm_90")
    with pytest.raises(TypeError, match="block_mask"):
        kp(F16, 64, on_gpu=True, device=90, block_mask=np.ones((2, 2), bool))
    from flashcupy.blocksparse import BlockMask

    mask = BlockMask(np.ones((2, 2), bool), 64, 64)
    assert kp(F16, 64, on_gpu=True, device=86, block_mask=mask, backward=True) == FP16_PATH
    assert kp(F32, 64, on_gpu=True, device=86, block_mask=mask) == CHUNKED
    assert kp(F64, 64, on_gpu=True, device=86, dropout_p=0.1) == CHUNKED


TF32_PATH = "fused fp32 (TF32 tensor cores)"


@pytest.mark.parametrize("device", [DEVICES[80], DEVICES[86], DEVICES[90], *CAPPED.values()],
                         ids=["sm_80", "sm_86", "sm_90", *CAPPED])
def test_kernel_path_names_the_tf32_kernels_only_where_they_run(device):
    """The pure half of tests/test_gpu_tf32.py's test of the same name (that one asks the GPU it runs on):
    every head dim up to 256 runs the TF32 kernels with allow_tf32 on sm_80+ (under 99 KB too), and only
    float32 without dropout or a block mask; nothing does below sm_80."""
    from flashcupy.blocksparse import BlockMask

    kp = interface.kernel_path
    exact = "fused fp32/fp64 (CUDA cores)"
    mask = BlockMask(np.ones((2, 2), dtype=bool))
    for head_dim in (*_configs.HEAD_DIM_BUCKETS, 8, 59, 250):
        for backward in (False, True):
            assert kp(F32, head_dim, on_gpu=True, device=device, allow_tf32=True, backward=backward) == TF32_PATH
            assert kp(F32, head_dim, on_gpu=True, device=device, backward=backward) == exact
            assert kp(F32, head_dim, on_gpu=True, device=device, allow_tf32=True, dropout_p=0.1,
                      backward=backward) == CHUNKED
            assert kp(F32, head_dim, on_gpu=True, device=device, allow_tf32=True, block_mask=mask,
                      backward=backward) == CHUNKED
            for dtype in [F16, F64] + ([np.dtype(BF16)] if BF16 is not None else []):
                same = kp(dtype, head_dim, on_gpu=True, device=device, backward=backward)
                assert kp(dtype, head_dim, on_gpu=True, device=device, allow_tf32=True, backward=backward) == same
                assert same != TF32_PATH
    assert kp(F32, 264, on_gpu=True, device=device, allow_tf32=True) == CHUNKED
    assert kp(F32, 64, on_gpu=False, device=device, allow_tf32=True) == "NumPy chunked path"
    assert kp(F32, 64, on_gpu=True, device=75, allow_tf32=True) == CHUNKED


def test_tf32_configs_are_float():
    """Every TF32 config (what tests/test_gpu_tf32.py launches one by one, and CI compiles) is the DMMA
    template with elem float and the m16n8k8 .tf32 instruction, 16 rows (keys) per warp, within its device's
    budget; the float32 chooser returns one of them for every bucket on every sm_80+ device class."""
    fwd, bwd = _configs.all_tf32_fwd_specializations(), _configs.all_tf32_bwd_specializations()
    assert fwd and bwd
    for c in fwd:
        assert isinstance(c, _configs.DmmaFwdConfig) and c.elem == "float" and c.katom == _configs.TF32_KATOM
        assert c.block_m // c.nwarps == 16
    for c in bwd:
        assert isinstance(c, _configs.DmmaBwdConfig) and c.elem == "float"
        assert c.kv_katom == c.dq_katom == _configs.TF32_KATOM
        assert c.kv_block_n // c.kv_nwarps == 16 and c.dq_block_m // c.dq_nwarps == 16
    for device in _configs.reference_devices():
        for bucket in _configs.HEAD_DIM_BUCKETS:
            f = _configs.float_fwd_config(bucket, F32, False, device, True)
            b = _configs.float_bwd_config(bucket, F32, False, device, True)
            assert f in fwd and b in bwd, (device, bucket)
            assert max(f.max_smem_bytes, b.max_smem_bytes) <= device.smem_optin


def test_kernel_path_without_a_gpu_says_so(monkeypatch):
    monkeypatch.setattr(interface, "gpu_available", lambda: False)
    with pytest.raises(RuntimeError, match="device="):
        interface.kernel_path(F16, 64, on_gpu=True)
    assert interface.kernel_path(F16, 64, on_gpu=False) == "NumPy chunked path"


def test_numpy_float64_goes_to_the_gpu_only_for_a_fused_kernel(monkeypatch):
    """NumPy float64 is copied to the GPU only where a fused kernel runs there for that direction."""
    shape = interface.AttnShape(1, 8, 8, 1, 1, 256, 0.1)
    monkeypatch.setattr(interface, "gpu_available", lambda: True)
    monkeypatch.setattr(interface, "NUMPY_FLOAT64_ON_GPU", True)
    for device, fwd, bwd in ((DEVICES[90], True, True), (DEVICES[86], True, False), (DEVICES[75], False, False)):
        monkeypatch.setattr(_device, "current_device_info", lambda device=device: device)
        args = (False, 0.0, None, False)
        assert interface._numpy_float64_to_gpu(np, F64, shape, "fwd", *args) is fwd
        assert interface._numpy_float64_to_gpu(np, F64, shape, "bwd", *args) is bwd
        assert not interface._numpy_float64_to_gpu(np, F64, shape, "fwd", False, 0.1, None, False)  # dropout
        assert not interface._numpy_float64_to_gpu(np, F32, shape, "fwd", *args)
    monkeypatch.setattr(interface, "NUMPY_FLOAT64_ON_GPU", False)
    assert not interface._numpy_float64_to_gpu(np, F64, shape, "fwd", False, 0.0, None, False)


def test_numpy_float64_on_the_gpu_is_opt_in(monkeypatch):
    """Default: NumPy float64 stays on the CPU even with a GPU and a fused kernel (issue 19 item 4);
    FLASHCUPY_NUMPY_FLOAT64_ON_GPU=1 or NUMPY_FLOAT64_ON_GPU = True opt in; the setting wins over the
    environment; a value other than 0 / 1 is a clear error."""
    shape = interface.AttnShape(1, 8, 8, 1, 1, 64, 0.1)
    monkeypatch.setattr(interface, "gpu_available", lambda: True)
    monkeypatch.setattr(_device, "current_device_info", lambda: DEVICES[90])
    monkeypatch.delenv("FLASHCUPY_NUMPY_FLOAT64_ON_GPU", raising=False)
    args = (np, F64, shape, "fwd", False, 0.0, None, False)
    assert interface.NUMPY_FLOAT64_ON_GPU is None and not interface._numpy_float64_to_gpu(*args)
    monkeypatch.setenv("FLASHCUPY_NUMPY_FLOAT64_ON_GPU", "1")
    assert interface._numpy_float64_to_gpu(*args)
    monkeypatch.setattr(interface, "NUMPY_FLOAT64_ON_GPU", False)
    assert not interface._numpy_float64_to_gpu(*args)
    monkeypatch.setattr(interface, "NUMPY_FLOAT64_ON_GPU", None)
    monkeypatch.setenv("FLASHCUPY_NUMPY_FLOAT64_ON_GPU", "0")
    assert not interface._numpy_float64_to_gpu(*args)
    monkeypatch.setenv("FLASHCUPY_NUMPY_FLOAT64_ON_GPU", "yes")
    with pytest.raises(ValueError, match="FLASHCUPY_NUMPY_FLOAT64_ON_GPU: expected 0 or 1, got 'yes'"):
        interface._numpy_float64_to_gpu(*args)


# ------------------------------------------------------------------------------- on a GPU (marked)

def _recording(monkeypatch, fail=False):
    """Wrap the four launch functions: each call appends (name, config) to the returned list (or
    raises AssertionError with fail=True)."""
    from flashcupy import _gpu, _gpu_simt

    calls = []
    for mod in (_gpu, _gpu_simt):
        for name in ("forward", "backward"):
            fn = getattr(mod, name)

            def wrapped(*a, _fn=fn, _name=f"{mod.__name__}.{name}", **kw):
                if fail:
                    raise AssertionError(f"{_name} called: the chunked path should run")
                calls.append((_name, kw.get("config")))
                return _fn(*a, **kw)

            monkeypatch.setattr(mod, name, wrapped)
    return calls


def _fwd_bwd_checked(rng, dtype, head_dim, causal=True, **kw):
    import flashcupy
    from helpers import assert_backward_rule, assert_forward_rule, random_inputs, to_gpu

    q, k, v, dout = random_inputs(rng, 2, 70, 97, 4, 2, head_dim, dtype, grad=True)
    gq, gk, gv, gdout = to_gpu(q, k, v, dout)
    fwd = flashcupy.flash_attn_forward(gq, gk, gv, causal=causal, **kw)
    grads = flashcupy.flash_attn_backward(gdout, gq, gk, gv, forward=fwd)
    tf32 = bool(kw.get("allow_tf32")) and dtype == F32
    assert_forward_rule(fwd.out, fwd.lse, q, k, v, causal=causal, tf32=tf32)
    assert_backward_rule(grads, dout, q, k, v, causal=causal, tf32=tf32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_forced_sm75_runs_the_chunked_path(rng, monkeypatch, dtype):
    """FLASHCUPY_FORCE_CC=75: every GPU call runs the chunked path (no kernel compiled or launched),
    kernel_path says so, and the results pass the rule."""
    monkeypatch.setenv("FLASHCUPY_FORCE_CC", "75")
    monkeypatch.delenv("FLASHCUPY_SMEM_LIMIT_KB", raising=False)
    _recording(monkeypatch, fail=True)
    for backward in (False, True):
        assert interface.kernel_path(dtype, 64, on_gpu=True, backward=backward) == CHUNKED
    _fwd_bwd_checked(rng, dtype, 64)


# problems whose configs change (or whose backward goes chunked) under 99 KB: review section 4's list
CAPPED_PROBLEMS = [(F16, 256, {}), (F16, 128, {}), (F16, 96, {}), (F32, 64, {}), (F32, 256, {}),
                   (F32, 256, dict(allow_tf32=True)), (F32, 128, dict(allow_tf32=True)), (F64, 160, {}), (F64, 256, {})]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,head_dim,kw", CAPPED_PROBLEMS, ids=lambda x: str(x))
def test_gpu_99kb_cap_launches_only_fitting_configs(rng, monkeypatch, dtype, head_dim, kw):
    """FLASHCUPY_SMEM_LIMIT_KB=99 on an A100 / H100 / H200: the calls launch the 99 KB class's configs
    (each within 99 KB), or the chunked path where none fits, and pass the rule."""
    monkeypatch.setenv("FLASHCUPY_SMEM_LIMIT_KB", "99")
    monkeypatch.delenv("FLASHCUPY_FORCE_CC", raising=False)
    device = _device.current_device_info()
    if device.cc < 80:
        pytest.skip(f"{device.name} (sm_{device.cc}) runs the chunked path")
    assert device.smem_optin <= KB99
    calls = _recording(monkeypatch)
    _fwd_bwd_checked(rng, dtype, head_dim, **kw)
    assert all(cfg is not None and cfg.max_smem_bytes <= KB99 for _, cfg in calls), calls
    launched = {name.rsplit(".", 1)[1] for name, _ in calls}
    assert launched == ({"forward"} if (dtype, head_dim) == (F64, 256) else {"forward", "backward"}), calls


def test_sm90_bwd_lpt_groups_fit_the_grid():
    """The causal LPT grid's groups: L2-sized, at least 1, at most every pair, and never more than
    gridDim.y's 65535 groups (the kernel decodes that grid whatever the size: no other fallback)."""
    g = _gpu_sm90_bwd.lpt_group
    assert g(64, 4096, 128, 16) == (16 << 20) // (4096 * (128 * 8 + 8))
    assert g(3, 1024, 64, 32) == 3 and g(16, 1 << 20, 128, 16) == 1
    pairs = 3 * 65535 + 1
    assert -(-pairs // g(pairs, 1 << 20, 128, 16)) <= 65535


def test_features_route_to_each_familys_feature_kernels():
    """Issue 16's FEAT_* bits keep a call in its family (each family compiles its FEAT specializations),
    except the Hopper backward's hd64 tile with softcap or ALiBi (mma.sync); a sink never changes the
    backward's plan; compute capability < 8.0 stays chunked."""
    from flashcupy._features import FEAT_ALIBI, FEAT_ALL, FEAT_LOCAL, FEAT_SINK, FEAT_SOFTCAP

    h200, a100 = DEVICES[90], DEVICES[80]
    for feat in (FEAT_LOCAL, FEAT_SOFTCAP, FEAT_ALIBI, FEAT_SINK, FEAT_ALL):
        for hd in (64, 128):
            assert _dispatch.forward_plan(F16, hd, True, h200, features=feat).family == _dispatch.WGMMA
        assert _dispatch.backward_plan(F16, 128, True, h200, features=feat).family == _dispatch.WGMMA
        assert _dispatch.forward_plan(F16, 256, False, h200, features=feat).family == _dispatch.MMA16
        assert _dispatch.backward_plan(F16, 128, False, a100, features=feat).family == _dispatch.MMA16
        assert _dispatch.forward_plan(F32, 64, False, h200, features=feat).family == _dispatch.SIMT
        assert _dispatch.backward_plan(F64, 64, True, h200, features=feat).family == _dispatch.DMMA
        assert _dispatch.forward_plan(F32, 64, False, h200, allow_tf32=True, features=feat).family == _dispatch.TF32
        assert _dispatch.forward_plan(F16, 64, False, DEVICES[75], features=feat) is None
        assert _dispatch.forward_plan(F32, 64, False, h200, dropout=True, features=feat) is None  # as without
    for feat, family in ((FEAT_LOCAL, _dispatch.WGMMA), (FEAT_SINK, _dispatch.WGMMA), (FEAT_LOCAL | FEAT_SINK, _dispatch.WGMMA),
                         (FEAT_SOFTCAP, _dispatch.MMA16), (FEAT_ALIBI, _dispatch.MMA16), (FEAT_ALL, _dispatch.MMA16)):
        assert _dispatch.backward_plan(F16, 64, False, h200, features=feat).family == family, feat
    cfg = _gpu_sm90_bwd.config_for(128)
    assert not cfg.takes_features(FEAT_LOCAL, deterministic=True) and cfg.takes_features(FEAT_SOFTCAP, deterministic=True)
