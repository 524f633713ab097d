"""Scheduled summarization: new or changed documents under a folder or ``s3://`` prefix -> summaries, once each.

Entry point: ``python -m jobs.summarize`` (``jobs/summarize.py``), which calls ``run.run_tick`` at each
cron tick. Files:

- ``run``: the tick (config, plan, commit protocol, recovery of killed runs, ``runs.parquet``);
- ``documents``: listing and reading documents, fingerprinted by content;
- ``manifest``: which version of each document was committed, by which run;
- ``lock``: the run lock in the output store (owner, lease, takeover);
- ``schedule``: cron expressions in a timezone, tick ids, missed ticks.

Generation itself is the core pipeline's (``pipeline.run``).
"""
