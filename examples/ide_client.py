"""What an IDE plugin does: send a query to the code search service and list the matching code.

    mbert-retrieval index-code path/to/repo --index repo-index --model path/to/dense-model
    mbert-retrieval serve --index repo-index --token s3cret &
    python examples/ide_client.py "parse a json string" --language python --token s3cret

Prints one hit per line as `path:line  symbol  score`, the form editors turn into links.
"""

from __future__ import annotations

import argparse
import os
import sys

import httpx


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("query")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--path", help="glob over repository paths, e.g. 'src/**/*.py'")
    parser.add_argument("--language")
    parser.add_argument("--url", default="http://127.0.0.1:8765")
    parser.add_argument("--token", default=os.environ.get("MBERT_RETRIEVAL_TOKEN"))
    args = parser.parse_args()

    body = {"query": args.query, "k": args.k, "path": args.path, "language": args.language}
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    try:
        response = httpx.post(f"{args.url}/search", json=body, headers=headers, timeout=30)
    except httpx.TransportError as err:
        print(f"cannot reach the code search service at {args.url}: {err}", file=sys.stderr)
        return 1
    if response.status_code != 200:
        print(f"error {response.status_code}: {response.json().get('detail')}", file=sys.stderr)
        return 1
    for hit in response.json()["hits"]:
        print(f"{hit['path']}:{hit['start_line']}  {hit['symbol'] or '-'}  {hit['score']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
