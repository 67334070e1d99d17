"""`lm_eval` with the "hope" model registered: lm-eval 0.4.13 discovers models only through
its own built-in table (no entry-point group), so plain `lm_eval --model hope` cannot find it.

    python -m hope_dist.lm_eval_cli --model hope --model_args pretrained=DIR --tasks TASK [lm_eval options]
    hope-lm-eval ...   (the same, installed as a console script)
"""
import hope_dist.lm_eval_model  # noqa: F401  registers "hope"


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
