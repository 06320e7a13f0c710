"""N-way K-shot task sampling on synthetic images whose pixels name their class and example."""

from __future__ import annotations

import pytest
import torch

from maml_runner.errors import InvalidArgument
from maml_runner.tasks import FixedTasks
from maml_runner.tasks.classification import ImageClasses

CLASSES, EXAMPLES = 30, 20


def labelled_images() -> torch.Tensor:
    """uint8 [classes, examples, 1, 4, 4]: pixel (0, 0) holds the class, (0, 1) the example."""
    images = torch.zeros(CLASSES, EXAMPLES, 1, 4, 4, dtype=torch.uint8)
    images[:, :, 0, 0, 0] = torch.arange(CLASSES).view(-1, 1)
    images[:, :, 0, 0, 1] = torch.arange(EXAMPLES).view(1, -1)
    images[:, :, 0, 3, 3] = 255  # a corner mark to read the rotation back
    return images


def ids(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pixels = (x * 255).round().long()
    return pixels[..., 0, 0, 0], pixels[..., 0, 0, 1]


def test_tasks_have_distinct_classes_and_disjoint_support_and_query() -> None:
    family = ImageClasses(labelled_images(), n_way=5)
    batch = family.sample(64, torch.Generator().manual_seed(0), k_shot=2, query_size=3)
    assert batch.support_x.shape == (64, 10, 1, 4, 4) and batch.query_x.shape == (64, 15, 1, 4, 4)
    assert batch.support_x.dtype == torch.float32 and 0 <= batch.support_x.min()
    assert batch.support_x.max() <= 1
    s_class, s_example = ids(batch.support_x)
    q_class, q_example = ids(batch.query_x)
    for t in range(64):
        classes = s_class[t].view(5, 2)[:, 0]
        assert len(set(classes.tolist())) == 5, "N distinct classes per task"
        # label j is the j-th class, in support and query alike
        for j in range(5):
            assert set(s_class[t][batch.support_y[t] == j].tolist()) == {classes[j].item()}
            assert set(q_class[t][batch.query_y[t] == j].tolist()) == {classes[j].item()}
            support = set(s_example[t][batch.support_y[t] == j].tolist())
            query = set(q_example[t][batch.query_y[t] == j].tolist())
            assert len(support) == 2 and len(query) == 3 and not support & query
    # every class and example gets drawn over many tasks
    assert set(s_class.flatten().tolist()) == set(range(CLASSES))


def test_rotations_are_per_class_and_recorded() -> None:
    images = labelled_images()
    family = ImageClasses(images, n_way=4, rotations=True)
    batch = family.sample(50, torch.Generator().manual_seed(1), k_shot=1, query_size=1)
    turns = batch.info["rotations"]
    assert set(turns.flatten().tolist()) == {0, 1, 2, 3}
    for t in range(50):
        for j in range(4):
            c = batch.info["classes"][t, j]
            unrotated = torch.rot90(batch.support_x[t, j], -int(turns[t, j]), dims=(-2, -1))
            assert (unrotated * 255).round()[0, 3, 3] == 255
            assert (unrotated * 255).round()[0, 0, 0] == c


def test_sampling_is_determined_by_the_generator() -> None:
    family = ImageClasses(labelled_images(), n_way=5, rotations=True)
    a = family.sample(8, torch.Generator().manual_seed(3), k_shot=1, query_size=2)
    b = family.sample(8, torch.Generator().manual_seed(3), k_shot=1, query_size=2)
    c = family.sample(8, torch.Generator().manual_seed(4), k_shot=1, query_size=2)
    assert torch.equal(a.query_x, b.query_x) and not torch.equal(a.query_x, c.query_x)


def test_fixed_tasks_are_the_same_each_time_without_being_kept() -> None:
    family = ImageClasses(labelled_images(), n_way=5)
    tasks = FixedTasks(
        family,
        num_tasks=10,
        k_shot=1,
        query_size=2,
        seed=5,
        device=torch.device("cpu"),
        chunk=4,
        keep=False,
    )
    first, second = list(tasks.batches()), list(tasks.batches())
    assert [b.num_tasks for b in first] == [4, 4, 2]
    assert all(torch.equal(x.support_x, y.support_x) for x, y in zip(first, second))


def test_impossible_requests_say_what_is_allowed() -> None:
    with pytest.raises(InvalidArgument, match="n_way=31: images has 30 classes") as err:
        ImageClasses(labelled_images(), n_way=31)
    assert err.value.name == "n_way"
    family = ImageClasses(labelled_images(), n_way=5)
    with pytest.raises(InvalidArgument, match="k_shot \\+ query_size = 21") as err:
        family.sample(2, torch.Generator(), k_shot=6, query_size=15)
    assert err.value.name == "k_shot"


def test_a_split_without_rotations_is_not_copied() -> None:
    images = labelled_images()
    family = ImageClasses(images, n_way=5)
    assert family._views.untyped_storage().data_ptr() == images.untyped_storage().data_ptr()
