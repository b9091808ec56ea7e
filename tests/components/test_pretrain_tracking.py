"""The loss-curve plot: its title names the run once (it used to read "pretrain pretrain")."""

from pathlib import Path

from PIL import Image

from lmforge.components.pretrain.tracking import plot_loss_curve


def test_loss_curve_title_names_the_run_once(tmp_path: Path) -> None:
    path = plot_loss_curve([(1, 5.0), (2, 4.0)], [(2, 4.5)], tmp_path / "loss.png", "pretrain")
    assert path is not None
    with Image.open(path) as image:
        assert image.text["Title"] == "Loss of pretraining run 'pretrain'"


def test_no_curve_without_points(tmp_path: Path) -> None:
    assert plot_loss_curve([], [], tmp_path / "loss.png", "run") is None
    assert not (tmp_path / "loss.png").exists()
