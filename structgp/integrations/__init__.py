"""Bridges to other libraries. Import the submodule you need (``structgp.integrations.gpytorch``);
nothing is imported here, so importing structgp never imports botorch or touches gpytorch settings."""
