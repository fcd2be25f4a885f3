"""Errors the server answers with: an HTTP status, a stable code a client can branch on, and a message a
person can act on. Every error response has the body ``{"error": {"status", "code", "message"}}``."""

from __future__ import annotations


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"status": self.status, "code": self.code, "message": self.message}}


def error_body(status: int, code: str, message: str) -> dict:
    return ApiError(status, code, message).body()
