"""The RL side of AKOD: the schedule broker, the ScheduleEnv, and PPO with the DKO as policy.

- ``broker.py``: ScheduleBroker (named async actor) and BrokerClient (synchronous access);
  the Ray Train workers import only this module.
- ``env.py``: ScheduleEnv, one episode = one schedule built knot by knot.
- ``rl_module.py``: the PPO RLModule whose policy network is the DKO MLP.
- ``ppo.py``: build_ppo, deterministic_schedule, checkpoints.

Nothing is imported here, so that ``import akod_ray.rl.broker`` in a Train worker does not
load RLlib.
"""
