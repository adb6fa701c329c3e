import pytest
import torch

from latent_mca.batch import IGNORE_INDEX, ChatInputs


def qwen_like(lengths, patches, start=0):
    """Left-padded rows with one Qwen-style image each: ``patches[i]`` flattened patches of width 3."""
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = torch.arange(start + 10 * i + 1, start + 10 * i + 1 + n)
        mask[i, width - n:] = 1
    grid = torch.tensor([[1, 1, p] for p in patches])
    pixels = torch.cat([torch.full((p, 3), float(start + i)) for i, p in enumerate(patches)])
    return ChatInputs(ids, mask, labels=ids.clone(),
                      vision={"pixel_values": pixels, "image_grid_thw": grid, "mm_token_type_ids": mask.clone()})


def test_select_keeps_each_rows_image_patches():
    view = qwen_like([3, 2, 4], patches=[2, 4, 1])
    picked = view.select(torch.tensor([2, 0]))
    assert torch.equal(picked.input_ids, view.input_ids[[2, 0]])
    assert torch.equal(picked.vision["image_grid_thw"], torch.tensor([[1, 1, 1], [1, 1, 2]]))
    assert picked.vision["pixel_values"][:, 0].tolist() == [2.0, 0.0, 0.0]  # row 2's patch, then row 0's two


def test_cat_left_pads_per_token_tensors_and_concatenates_images():
    a, b = qwen_like([2, 1], patches=[1, 2]), qwen_like([4], patches=[3], start=100)
    both = ChatInputs.cat([a, b], pad_token_id=7)
    assert both.input_ids.shape == (3, 4)
    assert both.input_ids[0].tolist() == [7, 7, 1, 2] and both.input_ids[2].tolist() == b.input_ids[0].tolist()
    assert both.attention_mask[:2].tolist() == [[0, 0, 1, 1], [0, 0, 0, 1]]
    assert torch.equal(both.vision["mm_token_type_ids"], both.attention_mask)  # padded like the ids
    assert both.labels[1].tolist() == [IGNORE_INDEX] * 2 + [0, 11]  # the part's own padding label stays
    assert both.vision["image_grid_thw"][:, 2].tolist() == [1, 2, 3]
    assert both.vision["pixel_values"][:, 0].tolist() == [0.0, 1.0, 1.0, 100.0, 100.0, 100.0]
    # Round trip: selecting a part's rows back out gives that part (up to the extra left padding).
    back = both.select(torch.tensor([2]))
    assert torch.equal(back.input_ids, b.input_ids)
    assert torch.equal(back.vision["pixel_values"], b.vision["pixel_values"])


def test_cat_refuses_views_with_different_image_inputs():
    text_only = ChatInputs(torch.ones(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="different image inputs"):
        ChatInputs.cat([qwen_like([2], patches=[1]), text_only])


def test_flattened_patches_need_one_image_per_row():
    view = qwen_like([2, 2], patches=[1, 1])
    view.vision["image_grid_thw"] = view.vision["image_grid_thw"][:1]
    with pytest.raises(ValueError, match="one image per row"):
        view.select(torch.tensor([0]))
