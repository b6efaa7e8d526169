"""Static keys for hyperfunc's tests: limits are per key, enforced by the proxy itself."""
from fastapi import Request
from litellm.proxy._types import ProxyException, UserAPIKeyAuth

KEYS = {
    "sk-hf-free": {},
    "sk-hf-rpm3": {"rpm_limit": 3},
    "sk-hf-rpm3-b": {"rpm_limit": 3},
    "sk-hf-rpm3-bench": {"rpm_limit": 3},
    "sk-hf-rpm3-autotune": {"rpm_limit": 3},
    "sk-hf-tpm100": {"tpm_limit": 100},
}


async def user_api_key_auth(request: Request, api_key: str) -> UserAPIKeyAuth:
    key = api_key.removeprefix("Bearer ").strip()
    if key in KEYS:
        return UserAPIKeyAuth(api_key=key, **KEYS[key])
    raise ProxyException(message="unknown key", type="auth_error", param="api_key", code=401)
