"""Objectives and samplers.

  transport  SiT's continuous-time interpolants (Linear/GVP/VP; velocity/score/noise) and loss
  gaussian   DiT's discrete-time Gaussian diffusion: schedules, respacing, losses, DDPM/DDIM
  samplers   ODE (Euler/Heun/dopri5 via diffrax) and SDE samplers for the transport
  guidance   classifier-free guidance wrappers shared by every objective
  dynamic    the step-wise dynamic mediator schedule (per-sample switching)

Import the module you need; nothing heavy is imported eagerly.
"""
