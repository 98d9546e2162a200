"""TransVG: the fixed inference interface, the training contract, frozen parts, weight loading."""

import argparse

import pytest
import torch

from accord_medrpg.models import (FrozenBatchNorm2d, PhraseTokenizer, TacoOptions, TransVG, sine_position_embedding,
                                  train_vocabulary)
from accord_medrpg.models.transvg import quick_options
from accord_medrpg.weights import load_detr, load_transvg, map_transvg_key

PHRASES = ["large right-sided pneumothorax", "small left pleural effusion", "cardiomegaly"]


def tiny_model(taco_mode="max_image_lcpTriple"):
    options = quick_options(image_size=64, dim=16, max_query_len=8, resnet_widths=[4, 4, 8, 8], ffn_dim=32,
                            bert_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=32))
    return TransVG(options, TacoOptions(mode=taco_mode), train_vocabulary(PHRASES, 100), options.bert_config)


def batch(size=64, count=2):
    generator = torch.Generator().manual_seed(0)
    mask = torch.zeros(count, size, size, dtype=torch.bool)
    mask[1, :, size // 2:] = True  # the second image is padded on its right half
    return {
        "image": torch.randn(count, 3, size, size, generator=generator),
        "image_mask": mask,
        "phrase": ["small left pleural effusion", "cardiomegaly"][:count],
        "box": torch.tensor([[0.3, 0.6, 0.2, 0.3], [0.25, 0.5, 0.3, 0.4]])[:count],
        "negatives": torch.rand(count, 5, 4, generator=generator) * 0.3 + 0.2,
    }


def test_inference_interface_shapes_and_attention():
    model = tiny_model().eval()
    data = batch()
    with torch.no_grad():
        out = model(data["image"], data["image_mask"], data["phrase"])
    assert out["pred_box"].shape == (2, 4) and ((out["pred_box"] > 0) & (out["pred_box"] < 1)).all()
    assert out["reg_attention"].shape == (2, 4)  # 64 / 32 = a 2 x 2 grid
    assert out["tokens"].shape == (2, 1 + 8 + 4, 16) and out["attention"].shape == (2, 13, 13)
    # Eval mode: head-averaged softmax rows sum to 1; padded keys get no attention.
    torch.testing.assert_close(out["attention"].sum(-1), torch.ones(2, 13))
    assert out["visual_mask"][1].tolist() == [False, True, False, True]
    assert (out["attention"][1, :, 1 + 8:][:, out["visual_mask"][1]] == 0).all()
    assert out["text_mask"][1].tolist() == [False, False, False] + [True] * 5  # [CLS] cardiomegaly [SEP]


def test_training_contract_and_taco_switch():
    model = tiny_model()
    model.taco_scale = 0.5
    terms = model(batch())
    assert set(terms) == {"loss", "l1", "giou", "taco"}
    torch.testing.assert_close(terms["loss"], terms["l1"] + terms["giou"] + 0.5 * terms["taco"])
    terms["loss"].backward()
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(("visual.backbone.body.conv1", "visual.backbone.body.layer1")) for n in frozen)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert trainable == []  # DDP needs a gradient for every trainable parameter
    assert set(tiny_model(taco_mode="none")(batch())) == {"loss", "l1", "giou"}


def test_cross_batch_taco_with_marker_pooling_trains_every_parameter():
    phrases = ["a *left effusion* persists", "*cardiomegaly*"]  # within max_query_len - 2 = 6 tokens
    options = tiny_model().options
    model = TransVG(options, TacoOptions(mode="batch", text_pool="marker"), train_vocabulary(phrases, 100),
                    options.bert_config)
    model.taco_scale = 0.5
    terms = model({**batch(), "phrase": phrases})
    torch.testing.assert_close(terms["loss"], terms["l1"] + terms["giou"] + 0.5 * terms["taco"])
    terms["loss"].backward()
    assert [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    with pytest.raises(ValueError, match="'cardiomegaly': has fewer than two"):
        model({**batch(), "phrase": [phrases[0], "cardiomegaly"]})


def test_frozen_batch_norm_matches_eval_batch_norm_and_is_not_trained():
    bn = torch.nn.BatchNorm2d(3).eval()
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 2)
    frozen = FrozenBatchNorm2d(3)
    frozen.load_state_dict({k: v for k, v in bn.state_dict().items() if k != "num_batches_tracked"})
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(frozen(x), bn(x))
    assert not list(frozen.parameters())


def test_sine_positions_count_valid_cells_only():
    mask = torch.zeros(1, 2, 4, dtype=torch.bool)
    mask[0, :, 2:] = True
    pos = sine_position_embedding(mask, 8)
    assert pos.shape == (1, 2, 4, 8)
    # x is normalised over the 2 valid columns: the last valid column encodes 2*pi.
    expected = torch.sin(torch.tensor(2 * torch.pi * 2 / (2 + 1e-6)))
    torch.testing.assert_close(pos[0, 0, 1, 4], expected, atol=1e-5, rtol=0)


def test_bad_inputs_are_named():
    model = tiny_model().eval()
    data = batch()
    with pytest.raises(ValueError, match=r"image must be \(B, 3, 64, 64\)"):
        model(data["image"][:, :1], data["image_mask"], data["phrase"])
    with pytest.raises(ValueError, match="image_mask"):
        model(data["image"], data["image_mask"].float(), data["phrase"])
    with pytest.raises(ValueError, match="1 phrases for 2 images"):
        model(data["image"], data["image_mask"], data["phrase"][:1])


def reference_transvg_state(model: TransVG) -> dict:
    """Our weights under the reference's key names (the inverse of the documented mapping)."""
    inverse = {
        "visual.backbone.body.": "visumodel.backbone.0.body.",
        "visual.input_proj.": "visumodel.input_proj.",
        "visual.encoder.layers.": "visumodel.transformer.encoder.layers.",
        "text.bert.": "textmodel.bert.",
        "vl_transformer.layers.": "vl_transformer.encoder.layers.",
    }
    state = {}
    for key, value in model.state_dict().items():
        new = next((ref + key[len(ours):] for ours, ref in inverse.items() if key.startswith(ours)), key)
        if key.startswith("bbox_embed.layers."):
            index, rest = key.split(".", 3)[2:]
            new = f"bbox_embed.layers.{int(index) // 2}.{rest}"
        state[new] = value.clone()
    return state


def test_transvg_checkpoint_round_trip_and_strictness(tmp_path):
    source, target = tiny_model(), tiny_model()
    state = reference_transvg_state(source)
    state["textmodel.bert.pooler.dense.weight"] = torch.zeros(16, 16)  # dropped, as the pooler is unused
    path = tmp_path / "TransVG_R50_unc.pth"
    torch.save({"model": state, "args": argparse.Namespace(imsize=64), "epoch": 89}, path)
    load_transvg(target, path)
    for key, value in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[key], value)
    assert map_transvg_key("bbox_embed.layers.2.bias") == "bbox_embed.layers.4.bias"

    wrong = dict(state)
    wrong["vl_pos_embed.weight"] = torch.zeros(99, 16)
    torch.save({"model": wrong}, path)
    with pytest.raises(ValueError, match="vl_pos_embed.weight .99, 16. in the file"):
        load_transvg(tiny_model(), path)
    del wrong["vl_pos_embed.weight"]
    wrong["something.else"] = torch.zeros(1)
    torch.save({"model": wrong}, path)
    with pytest.raises(ValueError, match="map to nothing: something.else.*missing from the file: vl_pos_embed"):
        load_transvg(tiny_model(), path)


def test_detr_checkpoint_loads_the_visual_branch_only(tmp_path):
    source, target = tiny_model(), tiny_model()
    detr = {}
    for key, value in source.state_dict().items():
        if key.startswith("visual.backbone.body."):
            detr["backbone.0.body." + key[len("visual.backbone.body."):]] = value
        elif key.startswith("visual.input_proj."):
            detr["input_proj." + key[len("visual.input_proj."):]] = value
        elif key.startswith("visual.encoder.layers."):
            detr["transformer.encoder.layers." + key[len("visual.encoder.layers."):]] = value
    detr["backbone.0.body.bn1.num_batches_tracked"] = torch.tensor(0)
    detr["transformer.decoder.layers.0.linear1.weight"] = torch.zeros(2, 2)
    detr["class_embed.weight"] = torch.zeros(92, 16)
    path = tmp_path / "detr-r50.pth"
    torch.save({"model": detr}, path)
    loaded = load_detr(target, path)
    assert loaded and all(k.startswith("visual.") for k in loaded)
    torch.testing.assert_close(target.visual.input_proj.weight, source.visual.input_proj.weight)
    assert not torch.equal(target.vl_pos_embed.weight, source.vl_pos_embed.weight)


def test_bert_from_a_local_folder(tmp_path):
    from transformers import BertConfig, BertModel

    from accord_medrpg.models import read_bert_folder
    from accord_medrpg.weights import load_bert

    vocabulary = train_vocabulary(PHRASES, 100)
    folder = tmp_path / "bert-base-uncased"
    config = BertConfig(vocab_size=len(vocabulary), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32)
    BertModel(config).save_pretrained(folder)  # writes config.json (model_type bert) and the weights
    (folder / "vocab.txt").write_text("\n".join(vocabulary) + "\n")
    read_vocabulary, bert_config = read_bert_folder(folder)
    assert read_vocabulary == vocabulary and bert_config["hidden_size"] == 16
    options = quick_options(image_size=64, dim=16, max_query_len=8, resnet_widths=[4, 4, 8, 8], ffn_dim=32)
    model = TransVG(options, TacoOptions(), read_vocabulary, bert_config)
    load_bert(model, folder)
    saved = BertModel.from_pretrained(folder, add_pooling_layer=False)
    torch.testing.assert_close(model.text.bert.embeddings.word_embeddings.weight,
                               saved.embeddings.word_embeddings.weight)
    (folder / "vocab.txt").unlink()
    with pytest.raises(ValueError, match="vocab.txt: missing"):
        read_bert_folder(folder)


def test_the_trained_vocabulary_depends_only_on_the_phrases_and_tokenizes_unseen_words():
    vocabulary = train_vocabulary(PHRASES, 100)
    assert train_vocabulary(list(reversed(PHRASES)), 100) == vocabulary  # no order or hash-seed dependence
    assert vocabulary[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] and len(vocabulary) <= 100
    unseen = PHRASES[0].split()[0][::-1].lower()  # a word of known characters that no phrase holds
    assert unseen not in vocabulary
    assert "[UNK]" not in PhraseTokenizer(vocabulary, 16).tokenizer.encode(unseen).tokens
