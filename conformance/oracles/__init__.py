"""Float64 reference implementations of every op, written from the contracts in
``heteroserve.core.kernels`` and independent of any platform's code. Inputs are taken as given
(already rounded to the tested dtype) and computed in float64 on the host."""
