"""sidrec training and serving: trainers (SFT, GRPO, DPO), run/resume helpers, rewards, tasks,
the model factory, the vLLM server launcher and client. The entry scripts ``recipes/sft.py``,
``rl.py``, ``serve.py`` (and ``python -m recipes.<name>``) parse a YAML recipe and call these."""
