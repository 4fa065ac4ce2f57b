"""Tiny random models saved in the on-disk layouts of the hub checkpoints the stages take at paper scale.

Each builder writes a directory that `from_pretrained` opens the way it opens the real checkpoint, with the
real classes, the real sub-folders and file kinds (sharded safetensors where the hub shards, half-precision
weights on disk, Qwen3-VL's config saying bfloat16, tokenizers of the hub's tokenizer classes, the hub's
scheduler / processor settings), and returns the directory. Only the widths and depths are tiny (a few
seconds to build, on a CPU).

  build_sd35_medium(dir)           stabilityai/stable-diffusion-3.5-medium: StableDiffusion3Pipeline with a
                                   16-channel VAE (shift 0.0609, scale 1.5305), two CLIPs and a T5 encoder
  build_qwen_image_edit_2509(dir)  Qwen/Qwen-Image-Edit-2509: QwenImageEditPlusPipeline with its VAE, a
                                   Qwen2.5-VL text encoder (14 px patches) and the dynamic-shift scheduler
  build_qwen3_vl_instruct(dir)     Qwen/Qwen3-VL-8B-Instruct: Qwen3VLForConditionalGeneration in bf16 (weights
                                   and config), 16 px patches, the chat template in chat_template.json

What differs from the hub beyond the sizes: the tokenizers are trained here on a few English texts (the same
classes and special tokens), and the Qwen3-VL's untied lm_head puts most of the probability on the digits 1-5
at every text position (see build_qwen3_vl_instruct), so that a critic scored by digit expectation parses, as
a real instruction-tuned model's would, while its greedy answers end at once and do not parse.
"""

import json
import os
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the toy package, reward.py, rl_edit.py (texts for the tokenizers, the CLIP tokenizer)
    sys.path.insert(0, str(ROOT))

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
from toy.models import QWEN_CHAT_TEMPLATE  # noqa: E402 (Qwen's ChatML, content a string or image/text parts)
# OpenAI CLIP's normalisation (Qwen2.5-VL's image processor) and SigLIP's 0.5 (Qwen3-VL's)
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def _texts():
    """Texts the tiny tokenizers are trained on: the stages' prompts and answers, plus plain captions."""
    import reward
    import rl_edit
    texts = [v for v in reward.PROMPTS.values()] + [rl_edit.SYSTEM_PREFIX, rl_edit.USER_TURN]
    texts += ['{"reasoning": "the red circle is now blue", "score": [4]}', '{"reasoning": "", "score": [3, 4, 5]}',
              "The final rating is \\boxed{4}.", "a photo of a cat sitting on a red chair in a sunny garden",
              "make the sky purple and add a small boat", "a blue square above a green triangle on a white background",
              "replace the dog with a horse", "an astronaut riding a horse, oil painting, high detail"]
    return texts * 3


def _qwen_tokenizer(texts, vocab_size=600):
    """A Qwen2Tokenizer (byte-level BPE, Qwen's pre-tokenizer: every digit its own token) with Qwen's special tokens."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    vocab = dict(sorted(model["vocab"].items(), key=lambda kv: kv[1]))
    vocab.update({t: len(vocab) + i for i, t in enumerate(QWEN_SPECIAL)})  # after the BPE vocabulary, in Qwen's order
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                         unk_token=None, model_max_length=131072, chat_template=QWEN_CHAT_TEMPLATE)
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL[1:]})
    return tok, vocab, merges


def _save_processor(proc, vocab, merges, out_dir, chat_template_file):
    """A processor in the hub's files: preprocessor_config.json, video_preprocessor_config.json, the tokenizer
    (tokenizer.json + vocab.json / merges.txt) and the chat template in `chat_template_file`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    proc.image_processor.save_pretrained(out_dir)
    proc.video_processor.save_pretrained(out_dir)
    proc.tokenizer.save_pretrained(out_dir)
    for name in ("preprocessor_config.json", "video_preprocessor_config.json", "tokenizer_config.json"):
        cfg = json.loads((out_dir / name).read_text())
        cfg["processor_class"] = type(proc).__name__
        cfg.pop("chat_template", None)
        (out_dir / name).write_text(json.dumps(cfg, indent=2) + "\n")
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    if (out_dir / "chat_template.jinja").is_file():
        os.remove(out_dir / "chat_template.jinja")
    if chat_template_file.endswith(".json"):
        (out_dir / chat_template_file).write_text(json.dumps({"chat_template": proc.chat_template}, indent=2) + "\n")
    else:
        (out_dir / chat_template_file).write_text(proc.chat_template)


def _t5_tokenizer(texts):
    """A T5Tokenizer (Unigram, metaspace) over the words of `texts`, single characters as the fallback."""
    from transformers import T5Tokenizer
    words = sorted({w.strip(".,:;!?\"'()[]{}") for t in texts for w in t.split()} - {""})
    chars = sorted({c for t in texts for c in t if not c.isspace()})
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -5.0) for w in words] + [(c, -12.0) for c in chars]
    vocab = list(dict(vocab).items())  # a word that is also a character keeps one entry
    return T5Tokenizer(vocab=vocab, extra_ids=100, model_max_length=512)


def _resave_sharded(model, path, max_shard_size):
    """Replace a component's single weights file by shards + index, as the hub stores the large components."""
    shutil.rmtree(path)
    model.save_pretrained(path, max_shard_size=max_shard_size)


def _quiet_diffusers():
    import logging
    logging.getLogger("diffusers").setLevel(logging.ERROR)


# -----------------------------------------------------------------------------
# stabilityai/stable-diffusion-3.5-medium


def build_sd35_medium(out_dir, seed=0):
    """StableDiffusion3Pipeline directory laid out like stable-diffusion-3.5-medium.

    transformer: SD3Transformer2DModel (bf16 on disk), in/out 16 channels, patch 2, a dual-attention layer (MMDiT-X)
    and RMS qk-norm as in 3.5-Medium; vae: AutoencoderKL, 4 blocks (8x), 16 latent channels, SD3's shift and
    scale factors (fp32 on disk here); text_encoder / text_encoder_2: CLIPTextModelWithProjection (CLIP-L / CLIP-G
    stand-ins of different widths, fp16) with CLIPTokenizers of 77 tokens; text_encoder_3: T5EncoderModel (fp16,
    sharded) whose width is the transformer's joint_attention_dim, with a T5Tokenizer; scheduler:
    FlowMatchEulerDiscreteScheduler(shift=3.0). Native size 64 px (sample_size 8 latents).
    """
    from toy.models import _clip_tokenizer
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel
    out_dir = Path(out_dir)
    texts = _texts()
    clip_tok, vocab, merges = _clip_tokenizer(texts, vocab_size=400, max_length=77)
    t5_tok = _t5_tokenizer(texts)
    l_width, g_width, t5_width = 16, 32, 64  # CLIP-L 768, CLIP-G 1280, T5-XXL 4096 at full scale

    def clip(width, s):
        torch.manual_seed(s)
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(clip_tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, projection_dim=width, hidden_act="gelu",
            bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id, pad_token_id=1)).to(torch.float16)

    torch.manual_seed(seed + 3)
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=t5_width, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                 relative_attention_num_buckets=32, relative_attention_max_distance=128,
                                 feed_forward_proj="gated-gelu", is_encoder_decoder=False, dense_act_fn="gelu_new",
                                 pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)).to(torch.float16)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=t5_width, caption_projection_dim=32,
        pooled_projection_dim=l_width + g_width, pos_embed_max_size=16, dual_attention_layers=(0,),
        qk_norm="rms_norm").to(torch.bfloat16)
    torch.manual_seed(seed + 4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16), layers_per_block=1,
                        latent_channels=16, norm_num_groups=8, sample_size=64, scaling_factor=1.5305, shift_factor=0.0609,
                        use_quant_conv=False, use_post_quant_conv=False, force_upcast=True, mid_block_add_attention=True)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0), vae=vae,
        text_encoder=clip(l_width, seed + 1), tokenizer=clip_tok, text_encoder_2=clip(g_width, seed + 2),
        tokenizer_2=clip_tok, text_encoder_3=t5, tokenizer_3=t5_tok)
    _quiet_diffusers()
    pipe.save_pretrained(out_dir)
    _resave_sharded(t5, out_dir / "text_encoder_3", "40KB")  # model-0000k-of-0000n.safetensors + index, as the hub
    for sub in ("tokenizer", "tokenizer_2"):  # the classic CLIP files too, as the hub has them
        with open(out_dir / sub / "vocab.json", "w") as f:
            json.dump(vocab, f)
        with open(out_dir / sub / "merges.txt", "w") as f:
            f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return out_dir


# -----------------------------------------------------------------------------
# Qwen/Qwen-Image-Edit-2509


def build_qwen_image_edit_2509(out_dir, seed=0):
    """QwenImageEditPlusPipeline directory laid out like Qwen-Image-Edit-2509 (everything bf16 on disk).

    transformer: QwenImageTransformer2DModel, in_channels 64 (16 latent channels x 2x2 packing), out 16, RoPE
    axes (frame, h, w) summing to the head dim (sharded); vae: AutoencoderKLQwenImage, z_dim 16, 8x spatial
    (three down-samplings), the hub's latents_mean / latents_std; text_encoder: Qwen2_5_VLForConditionalGeneration
    (14 px patches, 2x2 merge, windowed attention; sharded); processor: Qwen2VLProcessor (Qwen2VLImageProcessor,
    patch 14, the hub's min/max pixels) + a Qwen2Tokenizer with Qwen's special tokens and a chat template;
    tokenizer/: the same tokenizer; scheduler: Qwen-Image's exponential, sequence-length-dependent shift.
    """
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline, QwenImageTransformer2DModel
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor,
                              Qwen2VLVideoProcessor)
    out_dir = Path(out_dir)
    tok, vocab, merges = _qwen_tokenizer(_texts())
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    image_proc = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=12845056, patch_size=14,
                                       temporal_patch_size=2, merge_size=2, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    proc = Qwen2VLProcessor(image_processor=image_proc, tokenizer=tok, video_processor=Qwen2VLVideoProcessor(),
                            chat_template=QWEN_CHAT_TEMPLATE)
    hidden, heads = 32, 4  # Qwen2.5-VL-7B: 3584, 28 (4 kv heads)
    half = hidden // heads // 2  # mrope sections (t, h, w) add up to head_dim / 2 (hub: 16, 24, 24 of 64)
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=128000,
                         rms_norm_eps=1e-6, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                          "mrope_section": [half - 2 * (half // 3), half // 3, half // 3]},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, in_chans=3, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1],
                           out_hidden_size=hidden, hidden_act="silu"),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    torch.manual_seed(seed + 1)
    text_encoder = Qwen2_5_VLForConditionalGeneration(cfg).to(torch.bfloat16)
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=hidden,
                                              guidance_embeds=False, axes_dims_rope=(4, 6, 6)).to(torch.bfloat16)
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLQwenImage(
        base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[], temperal_downsample=[False, True, True],
        dropout=0.0, latents_mean=[-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715,
                                   0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
        latents_std=[2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579, 1.6382,
                     1.1253, 2.8251, 1.916]).to(torch.bfloat16)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
        max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential", invert_sigmas=False,
        stochastic_sampling=False, use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False)
    _quiet_diffusers()
    QwenImageEditPlusPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok, processor=proc,
                              transformer=transformer).save_pretrained(out_dir)
    shutil.rmtree(out_dir / "processor")
    _save_processor(proc, vocab, merges, out_dir / "processor", "chat_template.jinja")
    _resave_sharded(transformer, out_dir / "transformer", "100KB")  # diffusion_pytorch_model-0000k-of-0000n + index
    _resave_sharded(text_encoder, out_dir / "text_encoder", "100KB")
    return out_dir


# -----------------------------------------------------------------------------
# Qwen/Qwen3-VL-8B-Instruct


def build_qwen3_vl_instruct(out_dir, seed=0):
    """Qwen3VLForConditionalGeneration directory laid out like Qwen3-VL-8B-Instruct.

    Weights sharded safetensors in bf16 and config.json "dtype": "bfloat16" (as the hub ships it); untied lm_head
    (as the 8B); vision patch 16, 2x2 merge, deepstack; the processor (Qwen3VLProcessor: Qwen2VLImageProcessor with
    patch 16, merge 2, the hub's min/max pixels and SigLIP's 0.5 normalisation, Qwen3VLVideoProcessor, Qwen2Tokenizer)
    and the chat template in chat_template.json only; generation_config.json with the hub's sampling settings.

    One change from a plain random init: every text token's embedding carries a constant component along one
    hidden direction, and the lm_head reads that direction out into the digit tokens 1-5 and <|im_end|> only. At
    every text position ~75% of the probability is on the digits (the "expected" scoring method parses: a
    stand-in for a trained critic, which writes a digit after its answer prefix; which digit is likelier still
    depends on the input) and ~25% on <|im_end|>, more than on any one digit: greedy answers end at once and
    fail to parse (counted as failures, as a random critic's are), instead of running to max_new_tokens.
    """
    from transformers import (Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor,
                              Qwen3VLVideoProcessor)
    out_dir = Path(out_dir)
    tok, vocab, merges = _qwen_tokenizer(_texts())
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    image_proc = Qwen2VLImageProcessor(min_pixels=65536, max_pixels=16777216, patch_size=16, temporal_patch_size=2,
                                       merge_size=2, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    proc = Qwen3VLProcessor(image_processor=image_proc, tokenizer=tok, video_processor=Qwen3VLVideoProcessor(),
                            chat_template=QWEN_CHAT_TEMPLATE)
    hidden, heads, head_dim = 64, 4, 16  # 8B: 4096, 32 (8 kv heads), 128
    half = head_dim // 2  # mrope sections (t, h, w) add up to head_dim / 2 (hub: 24, 20, 20 of 64)
    cfg = Qwen3VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=262144,
                         rms_norm_eps=1e-6, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                          "mrope_section": [half - 2 * (half // 3), half // 3, half // 3],
                                          "mrope_interleaved": True},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=hidden, num_position_embeddings=2304,
                           deepstack_visual_indexes=[0], hidden_act="gelu_pytorch_tanh"),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(cfg)
    digits, eos = [tok.convert_tokens_to_ids(str(d)) for d in range(1, 6)], ids["<|im_end|>"]
    with torch.no_grad():  # the digit direction (docstring): hidden unit 0
        emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        emb[:, 0] = 1.0
        head[:, 0] = 0.0
        head[digits, 1:] *= 10.0  # input-dependent preferences among the digits
        # the final norm's output along unit 0 at a text position: the scale the readout must be divided by
        seen = []
        hook = model.model.language_model.norm.register_forward_hook(lambda m, i, o: seen.append(o[0, -1, 0].item()))
        model(**tok(["Rate it.<|im_end|>\n<|im_start|>assistant\n"], return_tensors="pt"))
        hook.remove()
        head[digits, 0] = 10.0 / seen[0]  # digit logits ~10: ~75% of the probability on the five digits ...
        head[eos, 0] = 10.6 / seen[0]  # ... and ~25% on <|im_end|>, more than on any one digit: greedy answers stop at once
    model = model.to(torch.bfloat16)
    gc = model.generation_config
    gc.bos_token_id, gc.pad_token_id, gc.eos_token_id = ids["<|endoftext|>"], ids["<|endoftext|>"], [ids["<|im_end|>"], ids["<|endoftext|>"]]
    gc.do_sample, gc.top_k, gc.top_p, gc.temperature, gc.repetition_penalty = True, 20, 0.8, 0.7, 1.0
    model.save_pretrained(out_dir, max_shard_size="200KB")
    # the hub keeps the chat template in chat_template.json (AutoProcessor reads it, AutoTokenizer does not)
    _save_processor(proc, vocab, merges, out_dir, "chat_template.json")
    return out_dir
