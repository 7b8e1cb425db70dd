"""The RL side of AKOD: the schedule broker, the DecisionEnv, and PPO with the DKO as policy.

- ``broker.py``: ScheduleBroker (named async actor) and BrokerClient (synchronous access);
  the Ray Train workers import only this module.
- ``env.py``: DecisionEnv, one episode = one decision window, one step per decision image.
- ``rl_module.py``: the PPO RLModule whose policy network is the DKO MLP.
- ``ppo.py``: build_ppo (with the pull towards the prior), the frozen control, checkpoints.
- ``reward.py``: a reward for every decision, the controls.
- ``worker_source.py``: the workers' side: every image's noise level from the DKO, the credits.
- ``driver.py``: the AKOD arm's driver (Ray Train, or one process with ``local_broker.py``).

Nothing is imported here, so that ``import akod_ray.rl.broker`` in a Train worker does not
load RLlib.
"""
