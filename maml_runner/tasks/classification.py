"""N-way K-shot image classification tasks (Omniglot, miniImageNet), sampled on the device.

The whole split lives on the run's device as one uint8 tensor ``[classes, examples, C, H, W]``;
a meta-batch is drawn with two ``torch.multinomial`` calls (classes per task, examples per
class) and one gather, with no Python loop over tasks or images. With ``rotations`` (Omniglot,
after Santoro et al. 2016) every class of a task is shown at a random multiple of 90°, drawn per
task and class, as the paper's reference code did: a task's N classes are always N distinct
characters. The rotated copies are stored beside the originals, so sampling stays one gather.

References:
    Finn, Abbeel & Levine (2017), §5.2; Vinyals et al. (2016) for the N-way K-shot protocol.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from maml_runner.errors import InvalidArgument, positive_int, require
from maml_runner.tasks.batch import TaskBatch
from maml_runner.tasks.losses import TaskLoss, classification_loss


@dataclass
class ImageClasses:
    """One split's classes: ``images`` uint8 ``[classes, examples, C, H, W]``.

    Args:
        images: the split's images; class ``c`` owns ``images[c]``.
        n_way: classes per task (N).
        rotations: show each class of a task rotated by a random multiple of 90°.
        name: for messages (``omniglot/train``).

    Raises:
        InvalidArgument: ``images`` not ``[classes, examples, C, H, W]``, ``n_way`` not an
            integer in 1..classes, or ``rotations`` of images that are not square.
    """

    images: torch.Tensor
    n_way: int
    rotations: bool = False
    name: str = "images"

    def __post_init__(self) -> None:
        shape = tuple(self.images.shape)
        require(
            len(shape) == 5 and shape[0] >= 1 and shape[1] >= 1,
            "images",
            f"shape {list(shape)}",
            "need [classes, examples, C, H, W] with at least one class and one example",
        )
        # one class: every prediction right, loss 0, a meaningless accuracy
        positive_int("n_way", self.n_way, minimum=2)
        num_classes = shape[0]
        require(
            self.n_way <= num_classes,
            "n_way",
            self.n_way,
            f"{self.name} has {num_classes} classes; choose n_way <= {num_classes}",
        )
        require(
            not self.rotations or shape[3] == shape[4],
            "rotations",
            self.rotations,
            f"90° rotations need square images, but {self.name}'s are {shape[3]}x{shape[4]}",
        )
        self.input_shape = tuple(self.images.shape[2:])
        self.output_size = self.n_way
        # [rotation, class, example, C, H, W]: one gather picks class, example and rotation.
        # Without rotations this is a view, not a copy (miniImageNet's train split is ~0.8 GB).
        if self.rotations:
            self._views = torch.stack(
                [torch.rot90(self.images, r, dims=(-2, -1)) for r in range(4)]
            )
        else:
            self._views = self.images.unsqueeze(0)

    small = False  # images: a meta-batch is drawn per step, fixed sets redrawn when used
    task_plot = None  # no task plot for images

    @property
    def task_loss(self) -> TaskLoss:
        return classification_loss()

    @property
    def num_classes(self) -> int:
        return self.images.shape[0]

    @property
    def examples_per_class(self) -> int:
        return self.images.shape[1]

    def sample(
        self, num_tasks: int, generator: torch.Generator, *, k_shot: int, query_size: int
    ) -> TaskBatch:
        """Draw tasks: N distinct classes, then K support + ``query_size`` query examples per
        class, all distinct. Shapes: x ``[T, N*K, C, H, W]`` float in [0, 1], y ``[T, N*K]``."""
        per_class = k_shot + query_size
        if per_class > self.examples_per_class:  # not require(): no message built per call
            raise InvalidArgument(
                "k_shot",
                k_shot,
                f"k_shot + query_size = {per_class} but {self.name} has "
                f"{self.examples_per_class} examples per class; choose a smaller sum",
            )
        device, n = self.images.device, self.n_way
        uniform = torch.ones(num_tasks, self.num_classes, device=device)
        classes = torch.multinomial(uniform, n, replacement=False, generator=generator)
        uniform = torch.ones(num_tasks * n, self.examples_per_class, device=device)
        examples = torch.multinomial(uniform, per_class, replacement=False, generator=generator)
        examples = examples.view(num_tasks, n, per_class)
        turns = torch.randint(
            len(self._views), (num_tasks, n, 1), device=device, generator=generator
        )
        x = self._views[turns, classes.unsqueeze(-1), examples]  # [T, N, K+Q, C, H, W] uint8
        x = x.float().div_(255)
        labels = torch.arange(n, device=device).view(1, n, 1)
        y = labels.expand(num_tasks, n, per_class)
        flat = (num_tasks, -1, *x.shape[3:])
        return TaskBatch(
            x[:, :, :k_shot].reshape(flat),
            y[:, :, :k_shot].reshape(num_tasks, -1),
            x[:, :, k_shot:].reshape(flat),
            y[:, :, k_shot:].reshape(num_tasks, -1),
            {"classes": classes, "rotations": turns.squeeze(-1)},
        )
