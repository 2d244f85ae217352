"""``pipeline.evaluate`` the DenseNet paper's way: the views it averages are torchvision's crops of real JPEGs,
computed here by hand; the default is the evaluation training logs; a tracked run gets the errors, still FINISHED."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import functional as F

from pipeline.config import IMAGENET_MEAN, IMAGENET_STD, load_config
from pipeline.data.imagenet import verify
from pipeline.data.index import load_index
from pipeline.data.loaders import build_loaders
from pipeline.data.synthetic import write_synthetic_imagenet
from pipeline.distributed import DistInfo
from pipeline.engine import evaluate
from pipeline.evaluate import cli, main, views_of
from pipeline.models import build_model

ROOT = Path(__file__).resolve().parents[1]
MINI = str(ROOT / "configs/mini.yaml")
MODEL = {"model.depth": 10, "model.growth_rate": 4, "model.num_classes": 10}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = write_synthetic_imagenet(tmp_path_factory.mktemp("data") / "tree", num_classes=10, train_per_class=1,
                                    val_per_class=3, min_side=20, max_side=60)
    verify(root, workers=1)
    return root


def make_model():
    """A small untrained DenseNet, its classifier sharpened: its predictions differ from image to image and from
    crop to crop."""
    torch.manual_seed(0)
    model = build_model("densenet_bc", num_classes=10, depth=10, growth_rate=4)
    with torch.no_grad():
        model.classifier.weight.mul_(5)
    return model.eval()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("run") / "model_final.pt"
    torch.save(make_model().state_dict(), path)
    return path


def config(tree, backend="torchvision", *extra):
    words = [f"data.root={tree}", f"data.backend={backend}", "data.image_size=24", "data.workers=1",
             "data.val_batch_size=4", "data.generate.enabled=false", "train.precision=fp32",
             *[f"{k}={v}" for k, v in MODEL.items()], *extra]
    return load_config(MINI, words)


def by_hand(tree, resize, crop, crops, flip):
    """top-1, top-5 (percent), loss and count of the softmax mean over torchvision's crops of each val image."""
    model, index = make_model(), load_index(tree)
    mean, std = (255 * torch.tensor(v)[:, None, None] for v in (IMAGENET_MEAN, IMAGENET_STD))
    correct1 = correct5 = 0
    losses = []
    files = sorted((tree / "val").glob("*/*.JPEG"))
    for file in files:
        image = transforms.Resize(resize, antialias=True)(Image.open(file).convert("RGB"))
        if crops == 10:
            views = transforms.TenCrop(crop)(image)
        else:
            views = [F.center_crop(image, crop)] + ([F.center_crop(F.hflip(image), crop)] if flip else [])
        batch = torch.stack([(torch.from_numpy(np.array(v)).permute(2, 0, 1).float() - mean) / std for v in views])
        with torch.no_grad():
            probs = model(batch).softmax(dim=1).mean(dim=0)
        label = index.classes.index(file.parent.name)
        top5 = probs.topk(5).indices.tolist()
        correct1 += top5[0] == label
        correct5 += label in top5
        losses.append(-probs[label].log().item())
    return 100 * correct1 / len(files), 100 * correct5 / len(files), float(np.mean(losses)), len(files)


@pytest.mark.parametrize("crops, flip", [(10, False), (1, True)])
def test_several_views_give_the_mean_softmax_of_torchvisions_crops_computed_by_hand(tree, weights, tmp_path, crops,
                                                                                    flip):
    cfg = config(tree)
    result = main(cfg, weights, tmp_path / "eval.json", views_of(cfg, crops, flip, resize=34, crop=24))
    top1, top5, loss, count = by_hand(tree, 34, 24, crops, flip)
    assert (result["top1"], result["top5"], result["count"]) == (top1, top5, count)
    assert result["loss"] == pytest.approx(loss, rel=1e-6)  # float32 sums in another order
    assert (result["top1_err"], result["top5_err"]) == (100 - top1, 100 - top5)
    top1, top5, loss, count = by_hand(tree, 34, 24, 1, False)  # the single crop, from the same pass
    single = result["single_crop"]
    assert (single["top1"], single["top5"], single["count"]) == (top1, top5, count)
    assert single["loss"] == pytest.approx(loss, rel=1e-6)
    assert single["loss"] != pytest.approx(result["loss"], rel=1e-3)  # the views change the prediction
    written = json.loads((tmp_path / "eval.json").read_text())
    assert written["views"] == ("10crop_34to24" if crops == 10 else "1crop_flip_34to24")
    assert written["single_crop"]["top1_err"] == 100 - top1


def test_the_default_evaluation_gives_the_numbers_training_logs(tree, weights, tmp_path):
    cfg = config(tree)
    result = main(cfg, weights, tmp_path / "eval.json")
    _, val = build_loaders(cfg, DistInfo(0, 1, 0, torch.device("cpu")), 4, train=False)
    trained = evaluate(make_model(), val, torch.device("cpu"), "fp32", True)
    assert {k: result[k] for k in trained} == trained  # exactly, loss included
    assert result["views"] == "1crop" and (result["resize"], result["crop"]) == (27, 24)


@pytest.mark.parametrize("words, named", [
    (["--crops", "5"], "--crops 5"),
    (["--crops", "10", "--flip"], "--flip with --crops 10"),
    (["--resize", "32", "--crop", "40"], "--crop 40 is larger than --resize 32"),
    (["--crop", "-3"], "--crop -3"),
    (["--flip", "data.backend=synthetic"], "--flip with data.backend=synthetic"),
])
def test_views_that_cannot_be_made_are_refused_by_the_options_name(tmp_path, capsys, words, named):
    assert cli([MINI, str(tmp_path / "model_final.pt"), *words]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and named in err


@pytest.mark.slow  # an MLflow SQLite store takes seconds to create
def test_a_tracked_runs_weights_get_the_errors_at_its_last_step_and_the_run_stays_finished(tree, tmp_path):
    from mlflow import MlflowClient

    from pipeline.tracking import RUN_ID_FILE, default_uri

    run_dir = tmp_path / "runs" / "first"
    run_dir.mkdir(parents=True)
    torch.save(make_model().state_dict(), run_dir / "model_final.pt")
    client = MlflowClient(default_uri(run_dir))  # where training keeps a run without tracking.uri
    experiment = client.create_experiment("densenet")
    run = client.create_run(experiment)
    for step in (10, 20):
        client.log_metric(run.info.run_id, "val/top1", 50.0, step=step)
    client.set_terminated(run.info.run_id, status="FINISHED")
    ended = client.get_run(run.info.run_id).info.end_time
    (run_dir / RUN_ID_FILE).write_text(json.dumps({"run_id": run.info.run_id, "experiment_id": experiment}))
    untracked = config(tree, "torchvision", "tracking.backend=none")
    main(untracked, run_dir / "model_final.pt", views=views_of(untracked, 10))
    assert client.get_metric_history(run.info.run_id, "eval/top1_err_10crop") == []
    cfg = config(tree, "torchvision", f"run.dir={tmp_path / 'elsewhere'}")
    result = main(cfg, run_dir / "model_final.pt", views=views_of(cfg, 10))
    history = client.get_metric_history(run.info.run_id, "eval/top1_err_10crop")
    assert [(m.step, m.value) for m in history] == [(20, result["top1_err"])]
    assert client.get_metric_history(run.info.run_id, "eval/top5_err_10crop")[0].value == result["top5_err"]
    single = client.get_metric_history(run.info.run_id, "eval/top1_err_1crop")
    assert [(m.step, m.value) for m in single] == [(20, result["single_crop"]["top1_err"])]
    after = client.get_run(run.info.run_id).info
    assert (after.status, after.end_time) == ("FINISHED", ended)


def test_the_launcher_passes_the_views_on_and_refuses_bad_ones_before_any_rank_starts(tmp_path, capsys):
    from launch.local import main as launch_main
    from launch.local import parse_args, torchrun_args

    words = torchrun_args(parse_args([MINI, "--evaluate", "w.pt", "--crops", "1", "--crop", "32", "--flip"]))
    assert words[words.index("pipeline.evaluate") + 1:] == [MINI, "w.pt", "--crops=1", "--crop=32", "--flip"]
    assert launch_main([MINI, "--evaluate", str(tmp_path / "model_final.pt"), "--crops", "5"]) == 2
    assert "error: --crops 5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        launch_main([MINI, "--crops", "10"])
    assert "--crops: options of an evaluation, given without --evaluate" in capsys.readouterr().err


def test_a_tracking_store_that_cannot_be_reached_is_a_warning_after_the_result_is_written(tree, weights, tmp_path,
                                                                                         capsys):
    from pipeline.distributed import free_port
    from pipeline.tracking import RUN_ID_FILE

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "model_final.pt").write_bytes(weights.read_bytes())
    (run_dir / RUN_ID_FILE).write_text(json.dumps({"run_id": "0123456789abcdef", "experiment_id": "1"}))
    cfg = config(tree, "torchvision", f"tracking.uri=http://127.0.0.1:{free_port()}")
    result = main(cfg, run_dir / "model_final.pt", views=views_of(cfg, 1, True))
    assert json.loads((run_dir / "eval.json").read_text())["top1_err"] == result["top1_err"]
    assert "Could not log the evaluation to the MLflow run" in capsys.readouterr().out
