"""`tapper build news|movielens|synthetic`: argparse wiring for the builders.

The main CLI calls `register(subparsers)`; each subcommand sets `func`, which
takes the parsed arguments and returns an exit code. `python -m
tapper.builders.cli ...` runs the same commands without the main CLI.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Relative to the project root, where CI and developers see the shared data.
DEFAULT_NEWS_SOURCE = Path("../shared/data/news_category")
DEFAULT_MOVIELENS_SOURCE = Path("../shared/data/movielens_small")


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    build = subparsers.add_parser(
        "build",
        help="build LaMP-format datasets (questions.json, outputs.json, README.md) from public data",
        description="Build LaMP-format datasets from public raw data or a synthetic generator.",
    )
    kinds = build.add_subparsers(dest="build_kind", metavar="{news,movielens,synthetic}", required=True)
    _add_news(kinds)
    _add_movielens(kinds)
    _add_synthetic(kinds)
    return build


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def _common(parser: argparse.ArgumentParser, default_source: Path | None) -> None:
    parser.add_argument("--out", type=Path, required=True, help="directory to write the build into (created if needed)")
    if default_source is not None:
        parser.add_argument(
            "--source",
            type=Path,
            default=default_source,
            help=f"raw data location (default: {default_source}, relative to the project root)",
        )
    parser.add_argument(
        "--queries-per-user",
        type=_positive,
        default=1,
        help="each user's latest items that become queries (default: 1)",
    )


def _add_news(kinds: argparse._SubParsersAction) -> None:
    parser = kinds.add_parser(
        "news",
        help="LaMP-2N (categorization) or LaMP-4 (headlines) from the HuffPost News Category Dataset",
        description="Users are single authors; each author's latest articles are queries, all earlier ones the "
        "profile. Attribution: R. Misra, 'News Category Dataset', arXiv:2209.11429, CC BY 4.0.",
    )
    _common(parser, DEFAULT_NEWS_SOURCE)
    parser.add_argument(
        "--task", choices=["LaMP_2N", "LaMP_4"], default="LaMP_2N", help="task to build (default: LaMP_2N)"
    )
    parser.add_argument(
        "--min-history", type=_non_negative, default=5, help="minimum profile items per user (default: 5)"
    )
    parser.add_argument("--max-users", type=_positive, default=None, help="keep only the N most active users")
    parser.add_argument(
        "--max-history",
        type=_positive,
        default=None,
        help="keep only each user's N most recent profile items (default: all)",
    )
    parser.add_argument("--no-progress", action="store_true", help="do not show progress bars")
    parser.set_defaults(func=_run_news)


def _add_movielens(kinds: argparse._SubParsersAction) -> None:
    parser = kinds.add_parser(
        "movielens",
        help="a LaMP-3-style personalized rating task (LaMP_3) from MovieLens ml-latest-small",
        description="The query is a movie, the gold the user's rating rounded half up to 1..5, the profile the "
        "user's earlier ratings with dates. Research use only; cite Harper & Konstan 2015.",
    )
    _common(parser, DEFAULT_MOVIELENS_SOURCE)
    parser.add_argument(
        "--min-history", type=_non_negative, default=5, help="minimum profile items per user (default: 5)"
    )
    parser.add_argument("--max-users", type=_positive, default=None, help="keep only the N most active users")
    parser.add_argument(
        "--max-history",
        type=_positive,
        default=200,
        help="keep only each user's N most recent ratings as profile (default: 200)",
    )
    parser.add_argument("--no-progress", action="store_true", help="do not show progress bars")
    parser.set_defaults(func=_run_movielens)


def _add_synthetic(kinds: argparse._SubParsersAction) -> None:
    parser = kinds.add_parser(
        "synthetic",
        help="a seeded synthetic LaMP_2N (or LaMP_2M) with a learnable, drifting personalization signal",
        description="Articles mention keywords of 2-3 candidate categories; the gold is the user's preferred one. "
        "Some users change preferences mid-history. Also writes users.json (drift flags, rankings).",
    )
    _common(parser, None)
    parser.add_argument("--users", type=_positive, default=200, help="number of users (default: 200)")
    parser.add_argument(
        "--history",
        type=_positive,
        nargs=2,
        metavar=("MIN", "MAX"),
        default=(20, 40),
        help="history items per user, drawn uniformly from MIN..MAX (default: 20 40)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--drift-fraction", type=_fraction, default=0.5, help="fraction of users whose preferences drift (default: 0.5)"
    )
    parser.add_argument(
        "--drift-at",
        type=float,
        nargs=2,
        metavar=("LO", "HI"),
        default=(0.3, 0.5),
        help="the drift date falls between these fractions of the user's history (default: 0.3 0.5)",
    )
    parser.add_argument(
        "--gap-days",
        type=_positive,
        nargs=2,
        metavar=("MIN", "MAX"),
        default=(1, 1),
        help="days between consecutive items, drawn uniformly from MIN..MAX (default: 1 1)",
    )
    parser.add_argument(
        "--drift-kind",
        choices=("swap", "reverse"),
        default="swap",
        help="swap: the top three categories trade places with three of the bottom nine; reverse: "
        "the whole ranking turns around (default: swap)",
    )
    parser.add_argument(
        "--task",
        choices=("LaMP_2N", "LaMP_2M"),
        default="LaMP_2N",
        help="news categories (LaMP_2N) or movie tags (LaMP_2M), each label with keywords of its own "
        "(default: LaMP_2N)",
    )
    parser.set_defaults(func=_run_synthetic)


def _run_news(args: argparse.Namespace) -> int:
    from tapper.builders.news import build_news

    summary = build_news(
        args.source,
        args.out,
        task=args.task,
        queries_per_user=args.queries_per_user,
        min_history=args.min_history,
        max_users=args.max_users,
        max_history=args.max_history,
        progress=not args.no_progress,
    )
    print(summary.describe())
    return 0


def _run_movielens(args: argparse.Namespace) -> int:
    from tapper.builders.movielens import build_movielens

    summary = build_movielens(
        args.source,
        args.out,
        queries_per_user=args.queries_per_user,
        min_history=args.min_history,
        max_users=args.max_users,
        max_history=args.max_history,
        progress=not args.no_progress,
    )
    print(summary.describe())
    return 0


def _run_synthetic(args: argparse.Namespace) -> int:
    from tapper.builders.synthetic import build_synthetic

    low, high = args.history
    if low > high:
        raise SystemExit(f"--history MIN must not exceed MAX (got {low} {high})")
    try:
        summary = build_synthetic(
            args.out,
            users=args.users,
            history=(low, high),
            queries_per_user=args.queries_per_user,
            seed=args.seed,
            drift_fraction=args.drift_fraction,
            drift_at=tuple(args.drift_at),
            gap_days=tuple(args.gap_days),
            drift_kind=args.drift_kind,
            task=args.task,
        )
    except ValueError as err:  # the generator's own range checks (--drift-at, --gap-days)
        raise SystemExit(f"tapper build synthetic: {err}") from None
    print(summary.describe())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tapper.builders.cli")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["build", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
