"""``loadcast api``: the forecasts served to planners, autoscalers and people.

:mod:`state` keeps the latest of every endpoint's scores (and a short history), mirror
statuses and global-model versions, fed from Kafka by :mod:`service`; :mod:`app` is the
aiohttp application that answers from that state.
"""
