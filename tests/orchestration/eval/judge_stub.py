"""A stand-in judge for test_chat_bench.py: `python judge_stub.py MODE LOG`.

Reads hanyeong's JSON object from stdin and appends it to LOG (one line per call). MODE 'score'
prints "Rating: [[7]]" when the judged answer holds Hangul, "Rating: [[9]]" otherwise; 'silent'
prints a verdict without a score; 'fail' exits 3 with a message on stderr.
"""

import json
import sys

mode, log = sys.argv[1], sys.argv[2]
payload = json.load(sys.stdin)
with open(log, "a", encoding="utf-8") as f:
    f.write(json.dumps(payload, ensure_ascii=False) + "\n")
if mode == "fail":
    print("judge: no API key", file=sys.stderr)
    sys.exit(3)
answer = payload["answers"][payload["turn"] - 1]
if mode == "silent":
    print("The answer is fine.")
else:
    print("Rating: [[7]]" if any("\uac00" <= c <= "\ud7a3" for c in answer) else "Rating: [[9]]")
