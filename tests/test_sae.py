from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from monitor.errors import MonitorError, SAEFormatError, SAEMismatchError
from monitor.runtime.fit import check_fit
from monitor.sae import SAE, SAEConfig, fvu, load_sae
from tests.builders import random_sae, tiny_model


def hand_sae(architecture: str, **kw) -> SAE:
    """d_in=2, d_sae=3: W_enc columns pick x0, x1 and x0+x1; W_dec rows are the unit axes."""
    sae = SAE(SAEConfig(architecture=architecture, d_in=2, d_sae=3, **kw))
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]))
        sae.b_enc.copy_(torch.tensor([0.0, -1.0, 0.5]))
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        sae.b_dec.copy_(torch.tensor([0.5, -0.5]))
        sae.threshold.copy_(torch.tensor([2.5, 0.5, 3.0]))
    return sae


X = torch.tensor([[2.0, 3.0], [-1.0, 0.5]])
# pre-activations: [[2, 2, 5.5], [-1, -0.5, 0]]


@pytest.mark.parametrize("architecture,expected", [
    ("relu", [[2.0, 2.0, 5.5], [0.0, 0.0, 0.0]]),
    ("jumprelu", [[0.0, 2.0, 5.5], [0.0, 0.0, 0.0]]),
    ("topk", [[0.0, 2.0, 5.5], [0.0, 0.0, 0.0]]),  # k=2; ties broken by topk
])
def test_hand_computed_encode(architecture, expected):
    sae = hand_sae(architecture, **({"k": 2} if architecture == "topk" else {}))
    f = sae.encode(X)
    if architecture == "topk":
        assert f[0, 2] == 5.5 and (f[0] > 0).sum() == 2 and f[1].abs().sum() == 0
    else:
        torch.testing.assert_close(f, torch.tensor(expected))


def test_batchtopk_is_jumprelu_with_one_threshold():
    sae = hand_sae("batchtopk", k=1)
    with torch.no_grad():
        sae.threshold.fill_(2.1)
    torch.testing.assert_close(sae.encode(X), torch.tensor([[0.0, 0.0, 5.5], [0.0, 0.0, 0.0]]))


def test_decode_and_apply_b_dec_to_input():
    sae = hand_sae("relu", apply_b_dec_to_input=True)
    # x - b_dec = [[1.5, 3.5], ...] -> pre [1.5, 2.5, 5.5]
    f = sae.encode(X[:1])
    torch.testing.assert_close(f, torch.tensor([[1.5, 2.5, 5.5]]))
    torch.testing.assert_close(sae.decode(f), torch.tensor([[1.5 + 5.5 + 0.5, 2.5 + 5.5 - 0.5]]))
    torch.testing.assert_close(sae.direction(2), torch.tensor([1.0, 1.0]))


@pytest.mark.parametrize("architecture", ["relu", "jumprelu", "batchtopk", "topk"])
def test_subset_equals_full(architecture):
    sae = random_sae(architecture)
    x = torch.randn(3, 7, 64)
    latents = torch.tensor([5, 0, 200, 17, 17, 255])
    full = sae.encode(x)[..., latents]
    sub = sae.subset_encoder(latents)
    torch.testing.assert_close(sub(x), full, rtol=1e-5, atol=1e-5)
    assert sub.is_cheap == (architecture != "topk")


def test_subset_out_of_range():
    with pytest.raises(SAEMismatchError, match="0..255"):
        random_sae("relu").subset_encoder([3, 256])


@pytest.mark.parametrize("architecture", ["relu", "jumprelu", "batchtopk", "topk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_save_load_roundtrip_bit_identical(tmp_path, architecture, dtype):
    sae = random_sae(architecture, dtype=dtype, model_name="tiny", hook_name="blocks.1.hook_resid_post")
    sae.save(tmp_path / "sae")
    loaded = SAE.load(tmp_path / "sae", dtype=None)
    assert loaded.cfg.architecture == architecture and loaded.cfg.k == sae.cfg.k
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(loaded, name), getattr(sae, name)), name
    if architecture in ("jumprelu", "batchtopk"):
        assert torch.equal(loaded.threshold, sae.threshold)
    assert loaded.hook_point.layer == 1
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    # SAELens reads batchtopk in its inference form
    assert cfg["architecture"] == {"relu": "standard", "batchtopk": "jumprelu"}.get(architecture, architecture)


def test_unknown_cfg_keys_are_kept(tmp_path):
    random_sae("relu").save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["some_future_key"] = 3
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    assert SAE.load(tmp_path).cfg.metadata["some_future_key"] == 3


def _break(tmp_path, mutate):
    random_sae("jumprelu").save(tmp_path)
    tensors = load_file(str(tmp_path / "sae_weights.safetensors"))
    mutate(tensors)
    save_file(tensors, str(tmp_path / "sae_weights.safetensors"))


def test_wrong_shape_names_file_tensor_and_shapes(tmp_path):
    _break(tmp_path, lambda t: t.__setitem__("W_dec", torch.zeros(256, 63)))
    with pytest.raises(SAEFormatError) as err:
        SAE.load(tmp_path)
    msg = str(err.value)
    assert "sae_weights.safetensors" in msg and "'W_dec'" in msg and "[256, 63]" in msg and "[256, 64]" in msg


def test_missing_tensor(tmp_path):
    _break(tmp_path, lambda t: t.pop("threshold"))
    with pytest.raises(SAEFormatError, match="'threshold' is missing"):
        SAE.load(tmp_path)


def test_nan_tensor(tmp_path):
    _break(tmp_path, lambda t: t["b_enc"].__setitem__(0, float("nan")))
    with pytest.raises(SAEFormatError, match="NaN"):
        SAE.load(tmp_path)


def test_bad_json_and_missing_dir(tmp_path):
    random_sae("relu").save(tmp_path)
    (tmp_path / "cfg.json").write_text("{not json")
    with pytest.raises(SAEFormatError, match=r"cfg.json: not valid JSON \(line 1"):
        SAE.load(tmp_path)
    with pytest.raises(MonitorError, match="no such SAE directory"):
        SAE.load(tmp_path / "nope")


def test_corrupt_safetensors(tmp_path):
    random_sae("relu").save(tmp_path)
    (tmp_path / "sae_weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(SAEFormatError, match="not a readable safetensors"):
        SAE.load(tmp_path)


def test_unknown_architecture_lists_valid(tmp_path):
    random_sae("relu").save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["architecture"] = "gated"
    cfg["metadata"].pop("trained_architecture")
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEFormatError, match="valid: .*jumprelu"):
        SAE.load(tmp_path)


def test_sparsify_layout(tmp_path):
    ref = random_sae("topk", k=4, apply_b_dec_to_input=True)
    save_file({"encoder.weight": ref.W_enc.T.contiguous(), "encoder.bias": ref.b_enc,
               "W_dec": ref.W_dec, "b_dec": ref.b_dec}, str(tmp_path / "sae.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({"expansion_factor": 4, "normalize_decoder": True,
                                                   "num_latents": 256, "k": 4, "d_in": 64}))
    loaded = SAE.load(tmp_path)
    x = torch.randn(5, 64)
    torch.testing.assert_close(loaded.encode(x), ref.encode(x))


def test_gemmascope_npz(tmp_path):
    ref = random_sae("jumprelu")
    np.savez(tmp_path / "params.npz", **{n: getattr(ref, n).detach().numpy() for n in
                                         ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")})
    loaded = SAE.load(tmp_path / "params.npz")
    x = torch.randn(5, 64)
    torch.testing.assert_close(loaded.encode(x), ref.encode(x))


def test_constant_norm_rescale_roundtrip():
    sae = random_sae("relu", normalize_activations="constant_norm_rescale")
    x = torch.randn(4, 64) * 10
    # scaling the input scales the reconstruction, latents are unchanged
    torch.testing.assert_close(sae.encode(x), sae.encode(3 * x))
    torch.testing.assert_close(sae(3 * x), 3 * sae(x), rtol=1e-4, atol=1e-4)


def test_fvu_hand_computed():
    x = torch.tensor([[1.0, 0.0], [3.0, 2.0]])  # mean [2, 1]; total variance 1+1+1+1 = 4
    x_hat = torch.tensor([[1.0, 1.0], [3.0, 2.0]])  # squared error 1
    assert fvu(x, x_hat) == pytest.approx(0.25)
    assert fvu(x, x) == 0.0


def test_check_fit_refuses_width_mismatch(tiny_tokenizer):
    model = tiny_model("llama")
    with pytest.raises(SAEMismatchError, match="hidden size 64"):
        check_fit(random_sae("relu", d_in=32), model, tiny_tokenizer, point=1)


def test_check_fit_refuses_random_sae(tiny_tokenizer):
    model = tiny_model("llama")
    with pytest.raises(SAEMismatchError, match="another model, layer"):
        check_fit(random_sae("relu"), model, tiny_tokenizer, point=1)


def test_load_sae_unknown_path(tmp_path):
    with pytest.raises(SAEFormatError):
        load_sae(tmp_path / "missing")
