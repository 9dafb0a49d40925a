"""`speechless config show|resolve`: the config reference and resolved configs."""

from __future__ import annotations

from typing import Annotated

import typer

from speechless.commands.options import ConfigOption, SetOption
from speechless.core.log import emit

app = typer.Typer(no_args_is_help=True)


def _schemas() -> dict:
    from speechless.pipeline import PipelineConfig
    from stages.stage0_encoder import EncoderPretrainConfig
    from stages.stage1_rvq import Stage1Config
    from stages.stage2_t2s import Stage2Config
    from stages.stage3_llm import Stage3Config

    return {"encoder": EncoderPretrainConfig, "stage1": Stage1Config, "stage2": Stage2Config, "stage3": Stage3Config, "pipeline": PipelineConfig}


def _schema(stage: str):
    from speechless.core.errors import UsageError

    schemas = _schemas()
    if stage not in schemas:
        raise UsageError(f"unknown stage {stage!r}; choose one of {', '.join(schemas)}")
    return schemas[stage]


@app.command()
def show(stage: Annotated[str, typer.Argument(help="Whose schema to print: stage1, stage2, pipeline.")]) -> None:
    """Print every config key of a stage with its default and documentation."""
    from speechless.core.config import describe

    emit("\n".join(f"{key} = {default}\n    {doc}" for key, default, doc in describe(_schema(stage))))


@app.command()
def resolve(stage: Annotated[str, typer.Argument(help="stage1, stage2 or pipeline.")], config: ConfigOption = None, set_: SetOption = None) -> None:
    """Validate a config file (+ overrides) and print the resolved YAML."""
    from speechless.core.config import load_config, to_yaml

    emit(to_yaml(load_config(_schema(stage), config, list(set_ or []))))
