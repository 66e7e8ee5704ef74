"""TextEncoder against transformers (UMT5EncoderModel) and diffusers (WanPipeline) as oracles."""
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("ftfy")

from anyid_rt.config import TextEncoderConfig  # noqa: E402
from anyid_rt.models.text_encoder import TextEncoder, clean_prompt, pad_embeddings  # noqa: E402
from anyid_rt.models.text_encoder_loader import ORIGINAL_TOKENIZER, ORIGINAL_WEIGHTS  # noqa: E402

PROMPTS = [
    "A man with short curly hair smiles at the camera, close shot.",
    "",
    "  a   woman &amp;amp; a child\n\twalking in the   park  ",
    "astronaut waves " * 300,  # longer than 512 tokens: truncated, keeps </s>
    "zebra quokka unknown words",  # unknown tokens
]

# The reference table (reference/wan22-ti2v-5b.md §8.1), written out here independently of the code under test.
REF_BLOCK_MAP = {
    "attn.q": "layer.0.SelfAttention.q", "attn.k": "layer.0.SelfAttention.k",
    "attn.v": "layer.0.SelfAttention.v", "attn.o": "layer.0.SelfAttention.o",
    "pos_embedding.embedding": "layer.0.SelfAttention.relative_attention_bias",
    "norm1": "layer.0.layer_norm", "norm2": "layer.1.layer_norm",
    "ffn.gate.0": "layer.1.DenseReluDense.wi_0", "ffn.fc1": "layer.1.DenseReluDense.wi_1",
    "ffn.fc2": "layer.1.DenseReluDense.wo",
}


@pytest.fixture(scope="module")
def tiny():
    return TextEncoder.tiny(seed=0)


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory, tiny):
    return tiny.save_pretrained(tmp_path_factory.mktemp("pipe"))


def _hf_oracle(folder, prompts, dtype=torch.float32):
    """Load the saved folder with transformers' own loaders and run the official recipe by hand."""
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean
    from transformers import AutoTokenizer, UMT5EncoderModel

    tok = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
    model = UMT5EncoderModel.from_pretrained(str(folder / "text_encoder"), dtype=torch.float32).eval()
    model = model.to(dtype)  # every weight in one dtype, as the official code runs it
    enc = tok([prompt_clean(p) for p in prompts], padding="max_length", max_length=512, truncation=True,
              add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state
    lens = enc.attention_mask.gt(0).sum(1)
    return [o[:n] for o, n in zip(out, lens)], enc


def test_tiny_sizes_and_weights_are_seeded(tiny):
    cfg = TextEncoderConfig.preset("tiny")
    assert tiny.config == cfg
    assert tiny.model.config.d_model == cfg.dim and tiny.model.config.num_layers == cfg.num_layers
    assert tiny.model.config.is_gated_act and tiny.model.config.dense_act_fn == "gelu_new"
    assert not tiny.model.training
    again = TextEncoder.tiny(seed=0)
    other = TextEncoder.tiny(seed=1)
    for (n, a), (_, b), (_, c) in zip(tiny.model.named_parameters(), again.model.named_parameters(),
                                      other.model.named_parameters()):
        assert torch.equal(a, b), n
        assert not torch.equal(a, c), n
    # the tokenizer is usable offline: </s> appended, padding id 0, unknown words map to <unk>
    ids, mask = tiny.tokenize(["a man", "zebra"])
    assert ids.shape == (2, 512) and ids[0, :3].tolist()[2] == 1 and mask[0].sum() == 3
    assert ids[1, :2].tolist() == [2, 1] and ids[0, 3:].eq(0).all()


def test_matches_transformers_oracle(tiny, diffusers_folder):
    ours = tiny.encode(PROMPTS)
    ref, enc = _hf_oracle(diffusers_folder, PROMPTS)
    assert len(ours) == len(PROMPTS)
    for o, r in zip(ours, ref):
        assert o.shape == r.shape and o.dtype == torch.float32
        torch.testing.assert_close(o, r, rtol=0, atol=1e-6)
    lens = [o.shape[0] for o in ours]
    assert lens[1] == 1  # "" -> </s> alone
    assert lens[3] == 512 and enc.input_ids[3, -1] == 1  # truncated, </s> kept last
    assert lens[0] == enc.attention_mask[0].sum()


def test_matches_diffusers_wan_pipeline(tiny):
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    tr = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=48,
                               out_channels=48, text_dim=32, freq_dim=32, ffn_dim=32, num_layers=1)
    vae = AutoencoderKLWan(base_dim=8, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                           temperal_downsample=[False, True, True], in_channels=12, out_channels=12,
                           is_residual=True, patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4,
                           decoder_base_dim=16)
    pipe = WanPipeline(tokenizer=tiny.tokenizer, text_encoder=tiny.model, transformer=tr, vae=vae,
                       scheduler=UniPCMultistepScheduler(), expand_timesteps=True)
    ref, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, max_sequence_length=512,
                                device=torch.device("cpu"), dtype=torch.float32)
    ours = tiny.encode(PROMPTS)
    assert ref.shape == (len(PROMPTS), 512, tiny.dim)
    torch.testing.assert_close(pad_embeddings(ours, 512), ref, rtol=0, atol=1e-6)
    for o, r in zip(ours, ref):  # diffusers zero-pads after the real length
        if o.shape[0] < 512:
            assert r[o.shape[0]:].abs().max().item() == 0
        assert r[o.shape[0] - 1].abs().sum() > 0


def test_diffusers_layout_round_trip_and_subfolder(tiny, diffusers_folder):
    a = TextEncoder.from_pretrained(diffusers_folder, dtype=torch.float32)
    b = TextEncoder.from_pretrained(diffusers_folder / "text_encoder", dtype="fp32")
    ref = tiny.encode(PROMPTS)
    for enc in (a, b):
        assert enc.model.shared.weight is enc.model.encoder.embed_tokens.weight  # tied, one copy
        assert not any(p.is_meta for p in enc.model.parameters())
        for o, r in zip(enc.encode(PROMPTS), ref):
            assert torch.equal(o, r)


def test_sharded_safetensors_folder(tiny, tmp_path):
    tiny.model.save_pretrained(str(tmp_path / "text_encoder"), max_shard_size="20KB")
    tiny.tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
    assert (tmp_path / "text_encoder" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "text_encoder").glob("model-*-of-*.safetensors"))) > 1
    enc = TextEncoder.from_pretrained(tmp_path, dtype=torch.float32)
    for o, r in zip(enc.encode(PROMPTS), tiny.encode(PROMPTS)):
        assert torch.equal(o, r)


def test_bare_weight_files(tiny, diffusers_folder, tmp_path):
    """A single weights file: transformers names in a .safetensors (sizes inferred without config.json)."""
    st = diffusers_folder / "text_encoder" / "model.safetensors"
    a = TextEncoder.from_pretrained(st, dtype=torch.float32)  # tokenizer found in ../tokenizer
    assert a.config == tiny.config
    assert torch.equal(a.encode(PROMPTS[0])[0], tiny.encode(PROMPTS[0])[0])
    import shutil
    shutil.copy(st, tmp_path / "te.safetensors")
    with pytest.raises(FileNotFoundError, match="pass tokenizer_path"):
        TextEncoder.from_pretrained(tmp_path / "te.safetensors")
    b = TextEncoder.from_pretrained(tmp_path / "te.safetensors", dtype=torch.float32,
                                    tokenizer_path=diffusers_folder / "tokenizer")
    assert torch.equal(b.encode(PROMPTS[2])[0], tiny.encode(PROMPTS[2])[0])


def test_original_layout_matches_reference_table(tiny, tmp_path):
    """Write an original-layout .pth by the reference table (not by our inverse mapping) and load it."""
    hf = tiny.model.state_dict()
    orig = {"token_embedding.weight": hf["shared.weight"].clone(),
            "norm.weight": hf["encoder.final_layer_norm.weight"].clone()}
    for n in range(tiny.config.num_layers):
        for o, h in REF_BLOCK_MAP.items():
            orig[f"blocks.{n}.{o}.weight"] = hf[f"encoder.block.{n}.{h}.weight"].clone()
    torch.save(orig, tmp_path / ORIGINAL_WEIGHTS)
    tiny.tokenizer.save_pretrained(str(tmp_path / ORIGINAL_TOKENIZER))
    loaded = TextEncoder.from_pretrained(tmp_path, dtype=torch.float32)
    assert loaded.config == tiny.config  # sizes inferred from the tensor shapes
    for o, r in zip(loaded.encode(PROMPTS), tiny.encode(PROMPTS)):
        assert torch.equal(o, r)
    # save_original writes exactly these names, and the .pth file path works directly too
    out = tiny.save_original(tmp_path / "written")
    written = torch.load(out / ORIGINAL_WEIGHTS, weights_only=True)
    assert set(written) == set(orig)
    for k in orig:
        assert torch.equal(written[k], orig[k]), k
    direct = TextEncoder.from_pretrained(out / ORIGINAL_WEIGHTS, dtype=torch.float32)
    assert torch.equal(direct.encode(PROMPTS[0])[0], tiny.encode(PROMPTS[0])[0])


def test_original_and_diffusers_layouts_agree_in_bf16(tiny, diffusers_folder, tmp_path):
    orig_dir = tiny.save_original(tmp_path)
    a = TextEncoder.from_pretrained(orig_dir, dtype=torch.bfloat16)
    b = TextEncoder.from_pretrained(diffusers_folder, dtype=torch.bfloat16)
    # every weight bf16 (transformers' own loader would keep `wo` in fp32; the official code does not)
    assert {p.dtype for p in a.model.parameters()} == {torch.bfloat16}
    ea, eb = a.encode(PROMPTS), b.encode(PROMPTS)
    ref, _ = _hf_oracle(diffusers_folder, PROMPTS, dtype=torch.bfloat16)
    for x, y, r in zip(ea, eb, ref):
        assert x.dtype == torch.bfloat16
        assert torch.equal(x, y)
        torch.testing.assert_close(x, r, rtol=0, atol=0)
    fp32 = a.encode(PROMPTS[0], dtype=torch.float32)[0]
    assert fp32.dtype == torch.float32 and torch.equal(fp32, ea[0].float())


def test_missing_unexpected_and_bad_shape_keys_are_named(tiny, tmp_path):
    d = tiny.save_original(tmp_path / "o")
    sd = torch.load(d / ORIGINAL_WEIGHTS, weights_only=True)
    del sd["blocks.1.ffn.fc1.weight"]
    sd["blocks.0.extra_proj.weight"] = torch.zeros(2)
    torch.save(sd, d / ORIGINAL_WEIGHTS)
    with pytest.raises(ValueError) as ei:
        TextEncoder.from_pretrained(d, dtype=torch.float32)
    msg = str(ei.value)
    assert "missing keys: blocks.1.ffn.fc1.weight (encoder.block.1.layer.1.DenseReluDense.wi_1.weight)" in msg
    assert "unexpected keys: blocks.0.extra_proj.weight" in msg

    from safetensors.torch import load_file, save_file
    p = tiny.save_pretrained(tmp_path / "d")
    st = load_file(str(p / "text_encoder" / "model.safetensors"))
    st["encoder.final_layer_norm.weight"] = torch.ones(7)
    del st["encoder.block.0.layer.0.SelfAttention.k.weight"]
    save_file(st, str(p / "text_encoder" / "model.safetensors"))
    with pytest.raises(ValueError, match=re.escape("encoder.block.0.layer.0.SelfAttention.k.weight")) as ei:
        TextEncoder.from_pretrained(p)
    assert "encoder.final_layer_norm.weight checkpoint (7,) vs model (32,)" in str(ei.value)


def test_missing_folder_or_tokenizer(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TextEncoder.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no umT5 text encoder found"):
        TextEncoder.from_pretrained(tmp_path)
    d = tiny.save_original(tmp_path / "o")
    import shutil
    shutil.rmtree(d / "google")
    with pytest.raises(FileNotFoundError, match="no tokenizer found"):
        TextEncoder.from_pretrained(d)


def test_cleaning_matches_official_and_diffusers():
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    cases = ["  a   b \n\t c  ", "Tom &amp;amp; Jerry", "&lt;b&gt;bold&lt;/b&gt;", "cafÃ© crÃ¨me",
             "\u201cquoted\u201d  text", "", "   ", "line1\r\nline2", "<b> Tom &amp;amp; Jerry </b>"]
    for c in cases:
        assert clean_prompt(c) == prompt_clean(c), c
    assert clean_prompt("  a   b \n\t c  ") == "a b c"
    assert clean_prompt("Tom &amp;amp; Jerry") == "Tom & Jerry"
    # ftfy leaves entities alone when the text holds '<'; then only the double html.unescape decodes them
    assert clean_prompt("<b> Tom &amp;amp; Jerry </b>") == "<b> Tom & Jerry </b>"
    assert clean_prompt("cafÃ© crÃ¨me") == "café crème"  # ftfy repairs mojibake
    assert clean_prompt("   ") == ""


def test_cache_hits_and_lru(tiny):
    enc = TextEncoder(tiny.model, tiny.tokenizer, tiny.config, cache_size=2)
    calls = []
    orig = enc._encode_batch
    enc._encode_batch = lambda batch: (calls.append(list(batch)), orig(batch))[1]

    a = enc.encode("a man walks")
    assert enc.cache_info() == (0, 1, 2, 1)
    b = enc.encode("  a  man   walks ")  # same after cleaning: a hit, no forward
    assert calls == [["a man walks"]] and enc.cache_info().hits == 1
    assert torch.equal(a[0], b[0]) and a[0].data_ptr() != b[0].data_ptr()
    b[0].zero_()  # mutating a result must not corrupt the cache
    assert torch.equal(enc.encode("a man walks")[0], a[0])

    out = enc.encode(["x one", "x one", "x two"])  # duplicates inside a call are computed once
    assert calls[-1] == ["x one", "x two"] and torch.equal(out[0], out[1])
    assert enc.cache_info().currsize == 2  # "a man walks" was evicted (least recently used)
    enc.encode("a man walks")
    assert calls[-1] == ["a man walks"]
    enc.clear_cache()
    assert enc.cache_info() == (0, 0, 2, 0)

    off = TextEncoder(tiny.model, tiny.tokenizer, tiny.config, cache_size=0)
    off.encode("a man")
    off.encode("a man")
    assert off.cache_info() == (0, 2, 0, 0)
    with pytest.raises(ValueError):
        TextEncoder(tiny.model, tiny.tokenizer, tiny.config, cache_size=-1)


def test_output_device_and_dtype(tiny):
    e = tiny.encode("a man", device="meta", dtype=torch.float16)[0]
    assert e.device.type == "meta" and e.dtype == torch.float16
    assert tiny.encode("a man")[0].device.type == "cpu"


def test_full_length_off_is_close(tiny):
    short = TextEncoder(tiny.model, tiny.tokenizer, tiny.config, full_length=False)
    for x, y in zip(short.encode(PROMPTS), tiny.encode(PROMPTS)):
        assert x.shape == y.shape
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad, name", [(None, "NoneType"), (b"bytes", "bytes"), (3, "int"),
                                       (["ok", None], "NoneType"), (["ok", b"x"], "bytes")])
def test_bad_prompt_types(tiny, bad, name):
    with pytest.raises(TypeError, match=name):
        tiny.encode(bad)


def test_empty_list_and_empty_string(tiny):
    with pytest.raises(ValueError, match="no prompts"):
        tiny.encode([])
    e = tiny.encode("")[0]
    assert e.shape == (1, tiny.dim) and torch.isfinite(e).all()


def test_pad_embeddings():
    a, b = torch.randn(3, 4), torch.randn(5, 4)
    p = pad_embeddings([a, b], 6)
    assert p.shape == (2, 6, 4) and torch.equal(p[0, :3], a) and p[0, 3:].eq(0).all() and torch.equal(p[1, :5], b)
    with pytest.raises(ValueError):
        pad_embeddings([torch.randn(7, 4)], 6)
