"""flashcupy/_params.py's NumPy mirror of AttnParams (cuda/flash_params.cuh) against the C struct:
sizeof and every field offset, read back from an NVRTC compile of the header (static_asserts
generated from the NumPy dtype), and the values attn_params() writes."""

import numpy as np
import pytest

from flashcupy import _build, _params
from flashcupy._validate import AttnShape

nvrtc = pytest.importorskip("cuda.bindings.nvrtc", reason="cuda-bindings (NVRTC) not installed")


def _compile(src: str, arch: str = "sm_80"):
    return _build.nvrtc_compile_source(src, [], arch, "params_check.cu")[:2]


def _asserts(struct: str, dtype: np.dtype) -> str:
    lines = [f'static_assert(sizeof({struct}) == {dtype.itemsize}, "sizeof({struct})");']
    for field, off in _params.field_offsets(dtype).items():
        lines.append(f'static_assert(__builtin_offsetof({struct}, {field}) == {off}, "{struct}.{field}");')
    return "\n".join(lines)


def _checked_source(extra: str = "") -> str:
    convert = _build.load_source("flash_bwd.cu")  # ConvertParams lives beside its kernel
    return (convert + "\n" + _asserts("AttnParams", _params.ATTN_PARAMS) + "\n"
            + _asserts("ConvertParams", _params.CONVERT_PARAMS) + "\n" + extra)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_numpy_mirror_matches_the_c_struct(arch):
    ok, log = _compile(_checked_source(), arch)
    assert ok, log


def test_the_check_fails_on_a_wrong_offset():
    """The static_asserts are live: one deliberately wrong offset is rejected, naming the field."""
    off = _params.field_offsets()["mask.kv_list.nblocks"]
    bad = f'static_assert(__builtin_offsetof(AttnParams, mask.kv_list.nblocks) == {off + 4}, "wrong nblocks");'
    ok, log = _compile(_checked_source(bad))
    assert not ok and "wrong nblocks" in log


def test_every_c_field_is_mirrored():
    """Field names of AttnParams in the header, in order, equal the dtype's (a field added to the C
    struct and not to the mirror fails here even where offsets happen to line up)."""
    import re

    text = (_build.cuda_dir() / "flash_params.cuh").read_text()
    body = re.search(r"struct AttnParams \{(.*?)\n\};", text, re.S).group(1)
    body = re.sub(r"//[^\n]*", "", body)
    names = []
    for decl in body.split(";"):
        decl = decl.strip()
        if not decl:
            continue
        decl = re.sub(r"^(const\s+)?[\w:<>]+\s*\*?\s*", "", decl)  # drop the type
        names += [n.strip().lstrip("*").strip() for n in decl.split(",")]
    assert names == list(_params.ATTN_PARAMS.names)


def test_attn_params_values():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 5, 4, 8)).astype(np.float32)
    k = rng.standard_normal((2, 7, 2, 8)).astype(np.float32)[:, :, :, :]
    shape = AttnShape(2, 5, 7, 4, 2, 8, 0.25)
    raw = _params.attn_params(shape, head_dim=8, scale=0.25, grad_scale=0.5, causal=True, window=(3, -1), q=q, k=k)
    rec = np.frombuffer(raw.tobytes(), dtype=_params.ATTN_PARAMS)[0]
    assert rec["q"]["data"] == q.ctypes.data and rec["q"]["row_stride"] == 4 * 8 and rec["k"]["batch_stride"] == 7 * 2 * 8
    assert rec["v"]["data"] == 0 and rec["lse"] == 0
    assert (rec["seqlen_q"], rec["seqlen_k"], rec["nheads"], rec["nheads_k"], rec["group"]) == (5, 7, 4, 2, 2)
    assert rec["scale"] == 0.25 and rec["grad_scale_f"] == np.float32(0.5)
    assert rec["scale_log2"] == pytest.approx(0.25 / np.log(2), rel=1e-15)
    assert (rec["mask"]["causal"], rec["mask"]["window_left"], rec["mask"]["window_right"]) == (1, 3, -1)
    assert rec["mask"]["kv_list"]["index"] == 0 and rec["dropout"]["keep_threshold"] == 0
    with pytest.raises(TypeError, match="unknown array"):
        _params.attn_params(shape, head_dim=8, scale=1.0, qq=q)
