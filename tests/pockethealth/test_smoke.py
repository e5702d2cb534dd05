def test_login_page_renders(client, db):
    assert client.get("/account/login/").status_code == 200
