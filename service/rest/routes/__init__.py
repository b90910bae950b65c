"""Thin HTTP routers: validate, call one service function, return a typed answer."""
