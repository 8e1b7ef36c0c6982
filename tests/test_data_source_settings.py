"""The data source (shards, or catalogue CSV + images) is declared and checked once for every
job that reads a split: training, evaluation and the similar-cases index."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from dermanet.data.sources import DataLocation, DataSourceSettings
from dermanet.eval.evaluate import EvaluateSettings
from dermanet.inference.index_build import IndexSettings
from dermanet.settings import add_arguments
from dermanet.train.settings import TrainSettings

JOBS = {
    TrainSettings: {},
    EvaluateSettings: {"checkpoint": "m.pt", "output": "out"},
    IndexSettings: {},
}
SOURCE = [f.name for f in dataclasses.fields(DataSourceSettings)]


def flag_help(cls: type) -> dict[str, str]:
    parser = argparse.ArgumentParser()
    add_arguments(parser, cls)
    return {a.dest: a.help for a in parser._actions if a.dest in SOURCE}


@pytest.mark.parametrize("cls", list(JOBS))
def test_every_job_has_the_same_source_flags_and_check(cls: type) -> None:
    assert flag_help(cls) == flag_help(DataSourceSettings) and len(flag_help(cls)) == len(SOURCE)
    for source, message in (
        ({}, "give either --shards or --csv"),
        ({"shards": "s", "csv": "c.csv", "images": "i"}, "not both or neither"),
        ({"csv": "c.csv"}, "--csv needs --images"),
    ):
        with pytest.raises(ValueError, match=message):
            cls(**JOBS[cls], **source).validate()
    settings = cls(**JOBS[cls], csv="c.csv", images="img", drop_missing=True, split_seed=3)
    assert settings.location == DataLocation(
        csv="c.csv", images="img", drop_missing=True, split_seed=3
    )
