from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from monitor.capture import HookPoint
from monitor.errors import MonitorError, SAEFormatError, SAEMismatchError
from monitor.runtime.fit import check_fit
from monitor.sae import SAE, SAEConfig, fvu, load_sae
from monitor.testing import random_sae, tiny_model


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


def write_sparsify(directory, ref, **cfg):
    """A sparsify-layout SAE (``cfg.json`` + ``sae.safetensors``) with ``ref``'s weights."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {"encoder.weight": ref.W_enc.T.contiguous(), "encoder.bias": ref.b_enc,
               "W_dec": ref.W_dec, "b_dec": ref.b_dec, **cfg.pop("extra_tensors", {})}
    save_file(tensors, str(directory / "sae.safetensors"))
    (directory / "cfg.json").write_text(json.dumps({
        "activation": "topk", "expansion_factor": 4, "normalize_decoder": True, "num_latents": 256,
        "k": 4, "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": 64, **cfg}))
    return directory


def sparsify_reference(x, ref, k):
    """sparsify's own encode: relu(linear(x - b_dec)), then the k largest."""
    pre = torch.relu((x - ref.b_dec) @ ref.W_enc + ref.b_enc)
    values, indices = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter_(-1, indices, values)


def test_sparsify_layout(tmp_path):
    ref = random_sae("topk", k=4, apply_b_dec_to_input=True)
    loaded = SAE.load(write_sparsify(tmp_path / "layers.5", ref))
    x = torch.randn(5, 64)
    torch.testing.assert_close(loaded.encode(x), sparsify_reference(x, ref, 4))
    assert loaded.hook_point == HookPoint(5)  # the block's output: resid_post
    assert SAE.load(tmp_path / "layers.5", layer=7).hook_point == HookPoint(7)


@pytest.mark.parametrize("cfg,reason", [
    ({"activation": "groupmax"}, "groupmax"),
    ({"skip_connection": True}, "W_skip"),
    ({"extra_tensors": {"W_skip": torch.zeros(64, 64)}}, "W_skip"),
    ({"transcode": True}, "transcoder"),
])
def test_sparsify_variants_that_are_not_topk_saes_are_refused(tmp_path, cfg, reason):
    write_sparsify(tmp_path / "layers.5", random_sae("topk", k=4), **cfg)
    with pytest.raises(SAEFormatError, match=f"cannot be read exactly.*{reason}"):
        SAE.load(tmp_path / "layers.5")


def test_sparsify_directory_without_layer_names_the_fix(tmp_path):
    write_sparsify(tmp_path / "my_sae", random_sae("topk", k=4))
    with pytest.raises(SAEFormatError, match=r"my_sae.*no layer number.*layer=12"):
        SAE.load(tmp_path / "my_sae")
    assert load_sae(tmp_path / "my_sae", layer=3).hook_point == HookPoint(3)
    assert load_sae(tmp_path / "my_sae", hook="blocks.4.hook_resid_pre").hook_point == HookPoint(4, "resid_pre")


def test_sparsify_submodule_hookpoint_is_refused(tmp_path):
    write_sparsify(tmp_path / "layers.5.mlp", random_sae("topk", k=4))
    with pytest.raises(SAEFormatError, match="reads the MLP.*only the residual stream"):
        SAE.load(tmp_path / "layers.5.mlp")


def write_gemmascope(path, ref):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{n: getattr(ref, n).detach().numpy() for n in
                      ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")})
    return path


def test_gemmascope_npz(tmp_path):
    ref = random_sae("jumprelu")
    path = write_gemmascope(tmp_path / "layer_12" / "width_16k" / "average_l0_71" / "params.npz", ref)
    loaded = SAE.load(path)
    x = torch.randn(5, 64)
    # Gemma Scope's JumpReLU: relu(pre) where pre > threshold, no b_dec subtracted
    pre = x @ ref.W_enc + ref.b_enc
    torch.testing.assert_close(loaded.encode(x), torch.relu(pre) * (pre > ref.threshold))
    assert loaded.hook_point == HookPoint(12)
    assert load_sae(path, layer=3).hook_point == HookPoint(3)
    assert load_sae(path.parent).hook_point == HookPoint(12)  # the directory holding params.npz


def test_gemmascope_without_layer_names_the_fix(tmp_path):
    path = write_gemmascope(tmp_path / "params.npz", random_sae("jumprelu"))
    with pytest.raises(SAEFormatError, match=r"params.npz.*layer=12"):
        SAE.load(path)
    assert load_sae(path, layer=5).hook_point == HookPoint(5)


def test_gemmascope_mlp_and_attention_saes_are_refused(tmp_path):
    for repo in ("gemma-scope-2b-pt-mlp", "models--google--gemma-scope-9b-pt-att"):
        path = write_gemmascope(tmp_path / repo / "layer_3" / "width_16k" / "average_l0_9" / "params.npz",
                                random_sae("jumprelu"))
        with pytest.raises(SAEFormatError, match="not the residual stream"):
            SAE.load(path)
    res = write_gemmascope(tmp_path / "gemma-scope-2b-pt-res" / "layer_3" / "params.npz", random_sae("jumprelu"))
    assert SAE.load(res).hook_point == HookPoint(3)


# --------------------------------------------------------------------- SAELens compatibility
def write_saelens(directory, ref, **cfg):
    """A SAELens 6 ``cfg.json`` (hook in metadata) + ``sae_weights.safetensors`` from ``ref``."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file({n: getattr(ref, n).detach().contiguous() for n in ("W_enc", "b_enc", "W_dec", "b_dec")},
              str(directory / "sae_weights.safetensors"))
    metadata = {"model_name": "tiny", "hook_name": "blocks.1.hook_resid_post",
                "sae_lens_version": "6.18.0", **cfg.pop("metadata", {})}
    (directory / "cfg.json").write_text(json.dumps({"architecture": "topk", "d_in": 64, "d_sae": 256,
                                                    "dtype": "float32", "device": "cpu", "k": 8,
                                                    "metadata": metadata, **cfg}))
    return directory


def saelens_topk_reference(x, ref, k, apply_b_dec_to_input=True):
    """SAELens 6 TopKSAE with rescale_acts_by_decoder_norm=True, written out from its source
    (sae_lens/saes/topk_sae.py: encode, decode, _act_times_W_dec)."""
    sae_in = x - ref.b_dec * apply_b_dec_to_input
    hidden_pre = (sae_in @ ref.W_enc + ref.b_enc) * ref.W_dec.norm(dim=-1)
    values, indices = torch.topk(hidden_pre, k=k, dim=-1, sorted=False)
    acts = torch.zeros_like(hidden_pre).scatter_(-1, indices, values.relu())
    recon = (acts * (1 / ref.W_dec.norm(dim=-1))) @ ref.W_dec + ref.b_dec
    return acts, recon


def test_saelens_topk_rescaled_by_decoder_norm_encodes_as_saelens(tmp_path):
    ref = random_sae("topk", k=8)
    with torch.no_grad():  # decoder rows of very different norms: the topk choice depends on them
        ref.W_dec.mul_(torch.linspace(0.05, 5.0, 256)[torch.randperm(256)][:, None])
    loaded = SAE.load(write_saelens(tmp_path / "sae", ref, rescale_acts_by_decoder_norm=True))
    x = torch.randn(50, 64) * 3
    acts, recon = saelens_topk_reference(x, ref, 8)
    torch.testing.assert_close(loaded.encode(x), acts, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loaded.decode(loaded.encode(x)), recon, rtol=1e-4, atol=1e-4)
    # saved again (decoder norms folded), it still reads the same
    again = SAE.load(loaded.save(tmp_path / "again"))
    torch.testing.assert_close(again.encode(x), acts, rtol=1e-4, atol=1e-4)


def test_saelens_6_defaults_apply_b_dec_to_input(tmp_path):
    """SAELens's config defaults ``apply_b_dec_to_input`` to true; a file without the key
    must read the same."""
    ref = random_sae("topk", k=8)
    loaded = SAE.load(write_saelens(tmp_path / "sae", ref))
    x = torch.randn(20, 64)
    pre = (x - ref.b_dec) @ ref.W_enc + ref.b_enc
    values, indices = pre.topk(8, dim=-1)
    torch.testing.assert_close(loaded.encode(x), torch.zeros_like(pre).scatter_(-1, indices, values.relu()))
    assert loaded.hook_point == HookPoint(1)


@pytest.mark.parametrize("hook,reason", [
    ("blocks.3.hook_mlp_out", "the MLP"),
    ("blocks.3.attn.hook_z", "attention"),
    ("blocks.3.hook_attn_out", "attention"),
    ("blocks.3.hook_resid_mid", r"the residual stream between attention and MLP \(resid_mid\)"),
])
def test_saelens_non_residual_hooks_are_refused(tmp_path, hook, reason):
    write_saelens(tmp_path / "sae", random_sae("topk", k=8), metadata={"hook_name": hook})
    with pytest.raises(SAEFormatError, match=f"cfg.json: hook '{re.escape(hook)}' reads {reason}"):
        SAE.load(tmp_path / "sae")


def test_load_sae_hook_and_layer_arguments(tmp_path):
    write_saelens(tmp_path / "sae", random_sae("topk", k=8), metadata={"hook_name": ""})
    with pytest.raises(SAEFormatError, match="layer=12"):
        _ = load_sae(tmp_path / "sae").hook_point
    assert load_sae(tmp_path / "sae", layer=2).hook_point == HookPoint(2)
    assert load_sae(tmp_path / "sae", hook="blocks.2.hook_resid_pre").hook_point == HookPoint(2, "resid_pre")
    assert load_sae(tmp_path / "sae", hook="resid_pre", layer=3).hook_point == HookPoint(3, "resid_pre")
    with pytest.raises(SAEFormatError, match="names layer 2 but layer=3"):
        load_sae(tmp_path / "sae", hook="blocks.2.hook_resid_post", layer=3)
    with pytest.raises(SAEFormatError, match="reads the MLP"):
        load_sae(tmp_path / "sae", hook="blocks.2.hook_mlp_out")


# SAELens 6.x's loader (sae_lens/loading/pretrained_sae_loaders.py), written out: a config whose
# sae_lens_version is missing or older than 6.0.0-rc.0 is rebuilt as a pre-6.0 config, and its
# metadata becomes only these top-level keys; otherwise metadata is kept whole (SAEMetadata(**m)).
SAELENS_LLM_METADATA_KEYS = {
    "model_name", "hook_name", "model_class_name", "hook_head_index", "model_from_pretrained_kwargs",
    "prepend_bos", "exclude_special_tokens", "neuronpedia_id", "context_size", "seqpos_slice",
    "dataset_path", "sae_lens_version", "sae_lens_training_version", "hook_name_out",
    "hook_head_index_out"}
SAELENS_CONFIG_FIELDS = {"d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input",
                         "normalize_activations", "reshape_activations"}


def saelens_loaded_metadata(cfg: dict) -> dict:
    from packaging.version import Version

    version = cfg.get("sae_lens_version") or (cfg.get("metadata") or {}).get("sae_lens_version")
    if not version or Version(version) < Version("6.0.0-rc.0"):
        return {k: v for k, v in cfg.items() if k in SAELENS_LLM_METADATA_KEYS}
    return dict(cfg["metadata"])


@pytest.mark.parametrize("architecture", ["relu", "jumprelu", "batchtopk", "topk"])
def test_saved_cfg_keeps_metadata_through_saelens(tmp_path, architecture):
    sae = random_sae(architecture, hook_name="blocks.1.hook_resid_post",
                     metadata={"max_input_norm": 123.5, "id": "tiny-sae"})
    cfg = json.loads((sae.save(tmp_path) / "cfg.json").read_text())
    metadata = saelens_loaded_metadata(cfg)
    assert metadata["max_input_norm"] == 123.5 and metadata["id"] == "tiny-sae"
    assert metadata["hook_name"] == "blocks.1.hook_resid_post"
    assert SAELENS_CONFIG_FIELDS <= cfg.keys() and cfg["reshape_activations"] == "none"
    assert cfg["architecture"] in ("standard", "jumprelu", "topk")
    if architecture == "topk":
        assert cfg["k"] == 8 and cfg["rescale_acts_by_decoder_norm"] is False
    assert SAE.load(tmp_path).max_input_norm == 123.5


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
