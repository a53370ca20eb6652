"""Drop-in: an existing transformers pipeline, monitored by changing one line.

    python examples/pipeline_dropin.py
"""

from transformers import pipeline

import monitor

model, tokenizer = monitor.load_default_model()
pipe = pipeline("text-generation", model=model, tokenizer=tokenizer, device="cpu")
pipe = monitor.wrap(pipe)  # <- the one changed line

messages = [{"role": "user", "content": "Write a Python function that deletes a file the user names."}]
result = pipe(messages, max_new_tokens=60, do_sample=False)
print(result[0]["generated_text"][-1]["content"])
print(f"[{pipe.last_report.outcome}]", sorted({h.rule_id for h in pipe.last_report.hits}))
