async def test_create_and_read(client, oidc):
    auth = oidc.auth("alice")
    created = await client.post("/tasks", json={"title": "  Buy milk "}, headers=auth)
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["title"] == "Buy milk"
    got = await client.get(f"/tasks/{body['id']}", headers=auth)
    assert got.json() == body
