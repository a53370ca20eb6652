"""The shortest useful program: the default model under the shipped policies.

    python examples/quickstart.py
"""

import monitor

guard = monitor.from_default()  # default model, shipped SAE, its catalog, policies/

for prompt in ["What is the capital of France?",
               "Write a Python function that runs a shell command given by the user."]:
    print(f"> {prompt}")
    for chunk in guard.stream(prompt, max_new_tokens=60, do_sample=False):
        print(chunk, end="", flush=True)
    report = guard.last_report
    print(f"\n[{report.outcome}] rules fired: {sorted({h.rule_id for h in report.hits}) or 'none'}\n")
