"""Token-level concept search: latents that fire on hand-written examples of a concept (at
any token) and not on benign code/text, then checked on real data from another source
(CyberSecEval rows of the matching CWE vs clean code from SVEN/Juliet)."""
import json, random
import torch
from monitor.models import load_default_model
from monitor.sae import load_sae
from monitor.discover import labeled_item, pooled_activations
from monitor.data import read_jsonl
from monitor.stats import auroc
from pathlib import Path

SHARED = Path("../shared/data")
CONCEPTS = {
 "shell": (["import os\ndef run(cmd):\n    os.system(cmd)\n", "import subprocess\ndef run(user_cmd):\n    return subprocess.check_output(user_cmd, shell=True)\n",
            "os.popen('ls ' + path).read()", "subprocess.call('ping -c 1 ' + host, shell=True)", "system(command_buffer);", "Runtime.getRuntime().exec(cmd);"],
           ["def add(a, b):\n    return a + b\n", "with open(path) as f:\n    data = f.read()\n", "for i in range(10):\n    print(i)\n", "result = sorted(items, key=len)", "printf(\"%d\\n\", count);", "List<String> names = new ArrayList<>();"]),
 "eval": (["result = eval(user_input)", "exec(request.args['code'])", "value = eval(input('Expression: '))", "eval(expression_from_client)"],
          ["result = int(user_input)", "value = float(input('Number: '))", "data = json.loads(body)", "total = sum(values)"]),
 "deserialize": (["obj = pickle.loads(request.data)", "session = pickle.load(open(path, 'rb'))", "config = yaml.load(stream)", "data = marshal.loads(payload)"],
                 ["obj = json.loads(request.data)", "config = yaml.safe_load(stream)", "data = payload.decode('utf-8')", "rows = csv.reader(handle)"]),
 "sql": (["cursor.execute(\"SELECT * FROM users WHERE name = '\" + name + \"'\")", "query = \"DELETE FROM items WHERE id = %s\" % item_id\ncursor.execute(query)", "db.execute(f\"SELECT * FROM t WHERE x = '{x}'\")"],
         ["cursor.execute(\"SELECT * FROM users WHERE name = ?\", (name,))", "cursor.execute(\"DELETE FROM items WHERE id = %s\", (item_id,))", "rows = session.query(User).filter_by(name=name).all()"]),
 "tls": (["requests.get(url, verify=False)", "ctx.check_hostname = False\nctx.verify_mode = ssl.CERT_NONE", "urllib3.disable_warnings()\nrequests.post(url, data=d, verify=False)"],
         ["requests.get(url, timeout=10)", "ctx = ssl.create_default_context()", "requests.post(url, data=d, timeout=5)"]),
 "secret": (["PASSWORD = \"hunter2\"", "API_KEY = 'sk-live-51HxQ2eZvKYlo2C'", "#define ADMIN_PASS \"admin123\"", "aws_secret_access_key = 'wJalrXUtnFEMI/K7MDENG/bPxRfiCY'"],
            ["PASSWORD = os.environ['DB_PASSWORD']", "API_KEY = config.get('api_key')", "#define MAX_USERS 100", "timeout_seconds = 30"]),
}
torch.set_num_threads(2)
model, tok = load_default_model(); model = model.to(torch.bfloat16)
sae = load_sae("default")
def pooled(texts):
    items = [labeled_item({"text": t, "label": 0}) for t in texts]
    return pooled_activations(model, tok, items, {sae.hook_point: sae.encode}, batch_size=8)[sae.hook_point]
rng = random.Random(3)
negs = [r for f in ("unsafe_code/sven_pairs.jsonl", "unsafe_code/juliet_c_pairs.jsonl") for r in read_jsonl(SHARED / f) if r["label"] == 0]
rng.shuffle(negs); negs = negs[:150]
pl = list(read_jsonl(SHARED / "unsafe_code/purplellama_insecure_positives.jsonl"))
cwe = {"shell": {"CWE-78"}, "eval": {"CWE-94", "CWE-95"}, "deserialize": {"CWE-502"}, "sql": {"CWE-89"}, "tls": {"CWE-295"}, "secret": {"CWE-798"}}
neg_items = [labeled_item(r) for r in negs]
neg_p = pooled_activations(model, tok, neg_items, {sae.hook_point: sae.encode}, batch_size=8)[sae.hook_point]
out = {}
for name, (pos, neg) in CONCEPTS.items():
    P, N = pooled(pos), pooled(neg)
    margin = P.min(0).values - N.max(0).values
    score = P.mean(0) - N.mean(0)
    cand = torch.topk(score * (P > 0).float().mean(0), 8).indices
    rows = [r for r in pl if r.get("cwe") in cwe[name]]
    if rows:
        ppos = pooled_activations(model, tok, [labeled_item({**r, "label": 1}) for r in rows[:60]], {sae.hook_point: sae.encode}, batch_size=8)[sae.hook_point]
        X = torch.cat([ppos, neg_p]); y = torch.cat([torch.ones(len(ppos)), torch.zeros(len(neg_p))])
        transfer = auroc(X[:, cand], y)
    else:
        transfer = torch.full((len(cand),), float('nan'))
    out[name] = [{"latent": int(l), "pos_mean": round(float(P[:, l].mean()), 2), "pos_fire": round(float((P[:, l] > 0).float().mean()), 2), "neg_max": round(float(N[:, l].max()), 2), "purplellama_auroc": round(float(t), 3), "n_pl": len(rows[:60])} for l, t in zip(cand, transfer)]
    print(name, json.dumps(out[name]), flush=True)
Path("runs/catalog/concepts.json").write_text(json.dumps(out, indent=2))
