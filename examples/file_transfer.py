"""Upload a file through the file server and download it again, as an agentcp 0.1.99 user writes it.

    python examples/file_transfer.py --data ./alice_data --file ./report.pdf --out ./report-copy.pdf

``upload_file`` returns the file's URL (share it with another agent in a message); ``download_file`` fetches a URL
into a local file. Exit status 0 when the copy is identical to the original, 1 otherwise.
"""
import argparse
import hashlib
import sys

from agentcp import AgentCP


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description="upload a file and download it again")
    parser.add_argument("--data", default="./alice_data", help="agent data directory")
    parser.add_argument("--ap", default="agentunion.cn", help="access point domain (the AID's suffix)")
    parser.add_argument("--name", default="alice", help="agent name (the AID's first label)")
    parser.add_argument("--seed", default="alice-example", help="seed password protecting the private key")
    parser.add_argument("--file", required=True, help="the file to upload")
    parser.add_argument("--out", required=True, help="where to save the downloaded copy")
    args = parser.parse_args()

    acp = AgentCP(args.data, seed_password=args.seed)
    aid = acp.create_aid(args.ap, args.name)
    if aid is None:
        print(f"cannot load identity {args.name}.{args.ap}", file=sys.stderr)
        return 1
    url = aid.upload_file(args.file)
    if not url:
        print("upload failed", file=sys.stderr)
        return 1
    print(f"uploaded: {url}", flush=True)
    result = aid.download_file(url, args.out)
    if not result or not result[1]:
        print("download failed", file=sys.stderr)
        return 1
    same = sha256(args.file) == sha256(args.out)
    print(f"downloaded to {args.out}: {'identical' if same else 'DIFFERENT'}", flush=True)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
