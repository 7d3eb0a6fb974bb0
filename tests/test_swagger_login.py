"""Swagger UI can authorize with a pasted token, and through the provider with PKCE."""

from __future__ import annotations

from taskapp.app import create_app
from tests.conftest import running


async def test_docs_offer_provider_login_with_pkce_when_configured(make_settings, oidc):
    app = create_app(make_settings(oidc_={"swagger_client_id": "taskapp-swagger"}))
    async with running(app) as client:
        schema = (await client.get("/openapi.json")).json()
        docs = await client.get("/docs")
    schemes = schema["components"]["securitySchemes"]
    assert schemes["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": schemes["bearerAuth"]["description"],
    }
    assert schemes["oidc"] == {
        "type": "openIdConnect",
        "openIdConnectUrl": f"{oidc.issuer}/.well-known/openid-configuration",
    }
    security = schema["paths"]["/tasks"]["get"]["security"]
    assert {"bearerAuth": []} in security
    assert {"oidc": ["openid"]} in security
    assert docs.status_code == 200
    assert '"clientId": "taskapp-swagger"' in docs.text
    assert '"usePkceWithAuthorizationCodeGrant": true' in docs.text


async def test_docs_without_client_id_offer_only_the_bearer_token(client):
    schema = (await client.get("/openapi.json")).json()
    assert set(schema["components"]["securitySchemes"]) == {"bearerAuth"}


async def test_docs_can_be_turned_off(make_settings):
    app = create_app(make_settings(docs_enabled=False))
    async with running(app) as client:
        assert (await client.get("/docs")).status_code == 404
        assert (await client.get("/openapi.json")).status_code == 404
        assert (await client.get("/healthz")).status_code == 200
