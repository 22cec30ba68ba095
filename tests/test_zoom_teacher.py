"""Teacher forcing through crops (:mod:`dip_r1.zoom.teacher`) is what a zoom rollout that wrote the teacher's
text computes: the same crops, the same log-probabilities, in every family."""

from __future__ import annotations

import torch
from zoom_tools import force_prefixes, zoom_batch

import dip_r1.rollout
from dip_r1.config import SamplingConfig
from dip_r1.models import PolicySpec, load_policy
from dip_r1.sft import SFTModule, target_completion
from dip_r1.tokens import TokenIds
from dip_r1.zoom.crops import Zoom
from dip_r1.zoom.teacher import teacher_batch, teacher_logprobs, zoom_targets

# Two tight groups and one person alone (source pixels of the 320x240 and 200x300 images).
PEOPLE = (
    (20.0, 20, 40, 70), (42, 22, 62, 72), (64, 18, 84, 68),
    (150, 120, 170, 170), (172, 124, 192, 174),
    (100, 200, 120, 230),
)  # fmt: skip


def test_teacher_forcing_equals_the_rollout_that_writes_the_target(tiny_model, monkeypatch):
    torch.manual_seed(0)
    model, processor = load_policy(tiny_model, freeze_vision=False)
    model.eval()
    coordinates = PolicySpec(tiny_model).data_spec(None)["coordinates"]
    inputs, sources, targets = zoom_batch(processor, coordinates, boxes=PEOPLE)
    tokens = TokenIds.of(model, processor)
    sampling = SamplingConfig(max_new_tokens=400, look_mode="zoom", max_looks=2)
    zoom = Zoom(sources, targets, processor, sampling, tokens)
    written = zoom_targets(zoom)[:1] + [
        target_completion(targets[1])
    ]  # a zoom row and a text row in one batch
    assert len(written[0].crops) == 2
    tok = processor.tokenizer
    scripts = [
        tok(written[0].text, add_special_tokens=False)["input_ids"] + [processor.tokenizer.eos_token_id]
    ]
    scripts.append(
        tok(written[1], add_special_tokens=False)["input_ids"] + [processor.tokenizer.eos_token_id]
    )
    force_prefixes(monkeypatch, scripts)
    rollout = dip_r1.rollout.sample_completions(
        model, inputs, sampling, tokens, group_size=1, zoom=zoom, keep_logprobs=True
    )
    assert rollout.crops[0] == written[0].crops  # the rollout opens exactly the teacher's crops
    batch = teacher_batch(zoom, inputs, written, processor.tokenizer.eos_token_id)
    logp = teacher_logprobs(model, batch)
    # Row 1 closes its (empty) look first and waits, masked, while row 0 writes its look. Qwen3.5's linear-attention
    # layers decay their state through masked columns (HF zeroes a padded input, not the decay), so there the
    # rollout of a row that waited differs from the unpadded sequence (by ~0.02 here); rollout and scoring still
    # agree (test_zoom), so training stays on-policy.
    for row in range(1 if "qwen3_5" in tiny_model else 2):
        sampled = rollout.completion_ids[row][rollout.mask[row]]
        assert sampled.tolist() == batch.completion_ids[row][batch.supervised[row]].tolist()
        teacher = logp[row][batch.supervised[row]]
        gap = (teacher - rollout.logprobs[row][rollout.mask[row]]).abs().max().item()
        assert gap <= 1e-4, (row, gap)
    # the crops are attended (as image tokens), never supervised
    image_pad = tokens.image[1]
    crop_columns = batch.completion_ids == image_pad
    assert int(crop_columns[0].sum()) > 0 and not bool((crop_columns & batch.supervised).any())
    assert len(batch.inputs["image_grid_thw"]) == 2 + 2  # two prompts, two crops
    # the loss reaches the vision tower through the crops as through the prompt's image
    model.zero_grad()
    (-teacher_logprobs(model, batch)[batch.supervised].mean()).backward()
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "visual" in n
    )


def test_a_cut_target_gets_no_eos(tiny_qwen2_vl):
    model, processor = load_policy(tiny_qwen2_vl)
    coordinates = PolicySpec(tiny_qwen2_vl).data_spec(None)["coordinates"]
    inputs, sources, targets = zoom_batch(processor, coordinates, boxes=PEOPLE)
    tokens = TokenIds.of(model, processor)
    zoom = Zoom(sources, targets, processor, SamplingConfig(look_mode="zoom"), tokens)
    texts = [target_completion(t) for t in targets]
    whole = teacher_batch(zoom, inputs, texts, processor.tokenizer.eos_token_id)
    cut = teacher_batch(zoom, inputs, texts, processor.tokenizer.eos_token_id, max_tokens=10)
    eos = processor.tokenizer.eos_token_id
    for row in range(2):
        written = whole.completion_ids[row][whole.supervised[row]].tolist()
        assert written[-1] == eos and len(written) > 10
        assert written[:-1] == processor.tokenizer(texts[row], add_special_tokens=False)["input_ids"]
        assert cut.completion_ids[row][cut.supervised[row]].tolist() == written[:10]  # cut: no EOS


def test_sft_in_zoom_mode_trains_on_the_zoom_teacher_completions(tiny_qwen2_vl):
    torch.manual_seed(0)
    module = SFTModule(PolicySpec(tiny_qwen2_vl), sampling=SamplingConfig(do_sample=False, look_mode="zoom"))
    module.configure_model()
    assert module.data_spec()["keep_source"]  # its batches carry the source images to crop
    inputs, sources, targets = zoom_batch(module.processor, module.data_spec()["coordinates"], boxes=PEOPLE)
    batch = {"inputs": inputs, "targets": targets, "sources": sources}
    loss = module.training_step(batch, 0)
    zoom = Zoom(sources, targets, module.processor, module.eval_sampling, module.token_ids)
    expected = teacher_batch(zoom, inputs, zoom_targets(zoom), module.tokenizer.eos_token_id)
    logp = teacher_logprobs(module.policy, expected)
    assert torch.allclose(loss, -logp[expected.supervised].mean(), atol=1e-6)
    assert any(c for c in [z.crops for z in zoom_targets(zoom)])  # the targets open crops


def test_a_crop_budget_past_the_image_processor_is_capped_at_it(tiny_checkpoint):
    # The image processor reduces an image of more than its max_pixels again; a crop shown at a size it then
    # changes would be read in a frame the model never saw. The budget is capped, so the shown size is encoded.
    model, processor = load_policy(tiny_checkpoint("qwen3_vl"), freeze_vision=False)
    inputs, sources, targets = zoom_batch(processor, "relative-1000", boxes=PEOPLE)
    cap = processor.image_processor.size.longest_edge
    sampling = SamplingConfig(look_mode="zoom", zoom_max_pixels=cap * 4)
    zoom = Zoom(sources, targets, processor, sampling, TokenIds.of(model, processor))
    assert zoom.processor_max_pixels == cap and zoom.crop_settings(0)["max_pixels"] == cap
    crops = zoom.open(0, processor.tokenizer("<look>[[0, 0, 1000, 1000]]</look>")["input_ids"])
    _, grid = zoom.pixels(0, crops)
    patch = processor.image_processor.patch_size
    assert crops[0].size[0] * crops[0].size[1] <= cap
    assert grid[0].tolist() == [1, crops[0].size[1] // patch, crops[0].size[0] // patch]
