"""Hand-written contexts (with {TYPE} slots) and hard negatives for make_pii_cases.py."""

from __future__ import annotations

import random

# (lang, template). Every type appears in several languages and syntaxes.
TEMPLATES: list[tuple[str, str]] = [
    # EMAIL
    ("en", "Please send the signed form to {EMAIL} before Friday."),
    ("en", "From: {EMAIL}\nSubject: Q3 numbers\n\nHi team, see attached."),
    ("es", "Para más información escriba a {EMAIL} o visite nuestra oficina."),
    ("pt", "Dúvidas? Fale conosco pelo e-mail {EMAIL}."),
    ("zh", "如有问题，请发送邮件至{EMAIL}，我们会尽快回复。"),
    ("en", '<a href="mailto:{EMAIL}">Contact support</a>'),
    ("en", "git log shows author Jane <{EMAIL}> committed 3 days ago"),
    ("zh", "联系人：王先生（{EMAIL}）"),
    # PHONE
    ("en", "Call us at {PHONE} between 9am and 5pm."),
    ("en", "For reservations phone {PHONE}, or book online."),
    ("es", "Llámame al {PHONE} cuando llegues al hotel."),
    ("es", "Teléfono de contacto: {PHONE}"),
    ("pt", "Ligue para {PHONE} e peça pelo Carlos."),
    ("pt", "WhatsApp: {PHONE} (somente mensagens)"),
    ("zh", "请拨打{PHONE}联系客服。"),
    ("zh", "手机：{PHONE}，微信同号"),
    ("en", "Emergency contact: Maria, {PHONE}."),
    ("es", "Mi número es {PHONE}, escríbeme por WhatsApp."),
    ("en", "| name | phone |\n| Bob | {PHONE} |"),
    ("pt", "Atendimento ao cliente {PHONE} de segunda a sexta."),
    # IPV4
    ("en", "Failed password for root from {IPV4} port 52144 ssh2"),
    ("en", "The API server listens on {IPV4}:8080."),
    ("es", "El servidor con IP {IPV4} no responde al ping."),
    ("pt", "O acesso veio do endereço {IPV4} às 03:12."),
    ("zh", "来自{IPV4}的请求被防火墙拦截。"),
    ("en", '{IPV4} - - [10/Oct/2023:13:55:36 +0000] "GET /index.html HTTP/1.1" 200 2326'),
    ("en", "host: {IPV4}\nport: 5432"),
    ("en", "Add {IPV4} to the allowlist, then restart nginx."),
    # IPV6
    ("en", "Connection from {IPV6} was refused."),
    ("en", "The AAAA record points to {IPV6}."),
    ("es", "La dirección IPv6 del router es {IPV6}."),
    ("pt", "Cliente conectado via IPv6 {IPV6}"),
    ("zh", "IPv6地址{IPV6}已分配给该设备。"),
    ("en", "listen [{IPV6}]:443 ssl;"),
    ("en", "ping6 {IPV6} returned 0% packet loss"),
    # CREDIT_CARD
    ("en", "Card number: {CREDIT_CARD}, exp 09/27"),
    ("en", "I paid with my card {CREDIT_CARD} but was charged twice."),
    ("es", "Mi tarjeta es {CREDIT_CARD} y caduca en 2027."),
    ("pt", "Número do cartão: {CREDIT_CARD}"),
    ("zh", "信用卡号{CREDIT_CARD}，有效期至2026年。"),
    ("en", '{"card": "{CREDIT_CARD}", "cvv": "123"}'),
    ("es", "Cargo rechazado para la tarjeta {CREDIT_CARD}."),
    # IBAN
    ("en", "Please wire the deposit to IBAN {IBAN} (reference: booking)."),
    ("es", "Transferencia a la cuenta {IBAN}, titular: Ana."),
    ("pt", "IBAN para pagamento: {IBAN}"),
    ("zh", "请汇款至国际银行账号{IBAN}。"),
    ("en", "Beneficiary account {IBAN}\nBIC: DEUTDEFF"),
    ("es", "Domiciliación bancaria: {IBAN}."),
    ("en", "iban={IBAN}&amount=100"),
    # US_SSN
    ("en", "SSN: {US_SSN}"),
    ("en", "My social security number is {US_SSN}, please keep it private."),
    ("es", "Número de seguro social (EE. UU.): {US_SSN}"),
    ("en", "Employee record — name: J. Doe, ssn {US_SSN}, dept 42"),
    ("zh", "美国社会安全号码：{US_SSN}"),
    ("pt", "O SSN dele é {US_SSN}."),
    # ES_DNI
    ("es", "DNI: {ES_DNI}"),
    ("es", "El titular, con documento {ES_DNI}, declara que los datos son ciertos."),
    ("en", "Spanish ID card number {ES_DNI} was scanned at check-in."),
    ("es", "Nombre: Lucía Pérez; NIF {ES_DNI}; domicilio en Madrid."),
    ("pt", "O documento espanhol {ES_DNI} foi apresentado."),
    ("zh", "西班牙身份证号：{ES_DNI}"),
    # ES_NIE
    ("es", "NIE: {ES_NIE}"),
    ("es", "Extranjero con NIE {ES_NIE} solicita cita previa."),
    ("en", "Her Spanish foreigner number is {ES_NIE}."),
    ("pt", "Número NIE {ES_NIE} registado."),
    ("zh", "外国人识别号{ES_NIE}已登记。"),
    ("es", "Tarjeta de residencia: {ES_NIE}, válida hasta 2028."),
    # MX_CURP
    ("es", "CURP: {MX_CURP}"),
    ("es", "Adjunta tu CURP ({MX_CURP}) al formulario de inscripción."),
    ("en", "The applicant's CURP is {MX_CURP}."),
    ("es", "curp={MX_CURP}; estado=activo"),
    ("zh", "墨西哥CURP：{MX_CURP}"),
    ("pt", "O CURP mexicano {MX_CURP} foi validado."),
    # MX_RFC
    ("es", "RFC: {MX_RFC}"),
    ("es", "Factura emitida al RFC {MX_RFC} por servicios profesionales."),
    ("en", "Mexican tax ID (RFC) {MX_RFC} on the invoice."),
    ("es", "Registro Federal de Contribuyentes {MX_RFC}, régimen general."),
    ("zh", "墨西哥税号{MX_RFC}"),
    ("pt", "RFC do fornecedor: {MX_RFC}."),
    # BR_CPF
    ("pt", "CPF: {BR_CPF}"),
    ("pt", "Meu CPF é {BR_CPF} e nasci em 1990."),
    ("pt", "Nota fiscal emitida para o CPF {BR_CPF}."),
    ("en", "Brazilian taxpayer number {BR_CPF} on file."),
    ("es", "El cliente brasileño con CPF {BR_CPF} pagó en efectivo."),
    ("zh", "巴西CPF号码{BR_CPF}"),
    # AR_CUIT
    ("es", "CUIT: {AR_CUIT}"),
    ("es", "Razón social: Ejemplo SA, CUIT {AR_CUIT}, IVA responsable inscripto."),
    ("es", "Mi CUIL es {AR_CUIT}."),
    ("en", "Argentine tax ID {AR_CUIT} was verified."),
    ("pt", "CUIT do fornecedor argentino: {AR_CUIT}"),
    ("zh", "阿根廷税号{AR_CUIT}"),
    # CL_RUT
    ("es", "RUT: {CL_RUT}"),
    ("es", "Boleta a nombre de Juan Soto, RUT {CL_RUT}."),
    ("es", "Ingrese su RUN {CL_RUT} para continuar."),
    ("en", "Chilean RUT {CL_RUT} registered."),
    ("pt", "O RUT chileno {CL_RUT} consta no contrato."),
    ("zh", "智利RUT：{CL_RUT}"),
    # URL_CREDENTIALS
    ("en", "DATABASE_URL={URL_CREDENTIALS}"),
    ("en", "Connect with `psql {URL_CREDENTIALS}` from the bastion."),
    ("es", "La cadena de conexión es {URL_CREDENTIALS}"),
    ("pt", "Use a URL {URL_CREDENTIALS} no arquivo de configuração."),
    ("zh", "数据库连接串：{URL_CREDENTIALS}"),
    ("en", 'url: "{URL_CREDENTIALS}"'),
    # AWS_ACCESS_KEY
    ("en", "aws_access_key_id = {AWS_ACCESS_KEY}"),
    ("en", "The leaked key {AWS_ACCESS_KEY} was rotated."),
    ("en", "export AWS_ACCESS_KEY_ID={AWS_ACCESS_KEY}"),
    ("es", "La clave de acceso {AWS_ACCESS_KEY} aparece en el log."),
    ("pt", "Chave de acesso AWS: {AWS_ACCESS_KEY}"),
    ("zh", "AWS访问密钥ID：{AWS_ACCESS_KEY}"),
    # AWS_SECRET_KEY
    ("en", "[default]\n{AWS_SECRET_KEY}\nregion = us-east-1"),
    ("en", "{AWS_SECRET_KEY}"),
    ("es", "Configuración:\n{AWS_SECRET_KEY}"),
    ("pt", "credenciais:\n  {AWS_SECRET_KEY}"),
    ("zh", "配置文件中有：\n{AWS_SECRET_KEY}"),
    # GITHUB_TOKEN
    ("en", "git clone https://{GITHUB_TOKEN}@github.com/acme/repo.git"),
    ("en", "Authorization: token {GITHUB_TOKEN}"),
    ("en", "I accidentally committed {GITHUB_TOKEN} to the repo, please revoke it."),
    ("es", "El token {GITHUB_TOKEN} ya fue revocado."),
    ("pt", "Token do GitHub: {GITHUB_TOKEN}"),
    ("zh", "GitHub令牌{GITHUB_TOKEN}已泄露。"),
    # GITLAB_TOKEN
    ("en", 'curl --header "PRIVATE-TOKEN: {GITLAB_TOKEN}" https://gitlab.example.com/api/v4/projects'),
    ("en", "The CI uses {GITLAB_TOKEN} to push tags."),
    ("es", "Token de GitLab: {GITLAB_TOKEN}"),
    ("pt", "Revogue o token {GITLAB_TOKEN} imediatamente."),
    ("zh", "GitLab访问令牌：{GITLAB_TOKEN}"),
    # SLACK_TOKEN
    ("en", "SLACK_BOT={SLACK_TOKEN}"),
    ("en", "Post alerts to {SLACK_TOKEN} when the job fails."),
    ("es", "El bot usa el token {SLACK_TOKEN}."),
    ("pt", "Webhook/token do Slack: {SLACK_TOKEN}"),
    ("zh", "Slack令牌{SLACK_TOKEN}请勿外传。"),
    # JWT
    ("en", "Authorization: Bearer {JWT}"),
    ("en", "The session cookie was {JWT}; it expired an hour later."),
    ("es", "Token de sesión: {JWT}"),
    ("pt", "Recebemos o JWT {JWT} no header."),
    ("zh", "登录后返回的令牌为{JWT}。"),
    ("en", '{"id_token": "{JWT}", "expires_in": 3600}'),
    # PRIVATE_KEY
    ("en", "Here is the deploy key:\n{PRIVATE_KEY}\nDo not share it."),
    ("en", "{PRIVATE_KEY}"),
    ("es", "Clave privada del servidor:\n{PRIVATE_KEY}"),
    ("pt", "Chave privada:\n{PRIVATE_KEY}\nfim."),
    ("zh", "私钥如下：\n{PRIVATE_KEY}"),
    # SECRET_ASSIGNMENT
    ("en", "config.py:\n{SECRET_ASSIGNMENT}\nDEBUG = False"),
    ("en", "{SECRET_ASSIGNMENT}"),
    ("en", "settings:\n  {SECRET_ASSIGNMENT}\n  timeout: 30"),
    ("es", "Variables de entorno:\n{SECRET_ASSIGNMENT}"),
    ("pt", "No arquivo .env coloque\n{SECRET_ASSIGNMENT}"),
    ("zh", "配置如下：\n{SECRET_ASSIGNMENT}"),
    ("en", 'client = Client(host="db")\n{SECRET_ASSIGNMENT}'),
    ("es", "Ejemplo de configuración:\n{SECRET_ASSIGNMENT}\nlog_level: info"),
    # BITCOIN_ADDRESS
    ("en", "Send donations to {BITCOIN_ADDRESS}."),
    ("en", "BTC: {BITCOIN_ADDRESS}"),
    ("es", "Envía el pago a la dirección bitcoin {BITCOIN_ADDRESS}."),
    ("pt", "Endereço de carteira: {BITCOIN_ADDRESS}"),
    ("zh", "比特币地址：{BITCOIN_ADDRESS}"),
    ("en", "withdrawal to {BITCOIN_ADDRESS} confirmed (3 confirmations)"),
    # ETHEREUM_ADDRESS
    ("en", "My ETH wallet is {ETHEREUM_ADDRESS}."),
    ("en", "Contract deployed by {ETHEREUM_ADDRESS} at block 1234567."),
    ("es", "Dirección de Ethereum: {ETHEREUM_ADDRESS}"),
    ("pt", "Envie os tokens para {ETHEREUM_ADDRESS}."),
    ("zh", "以太坊地址{ETHEREUM_ADDRESS}"),
    ("en", '"from": "{ETHEREUM_ADDRESS}",'),
    # Harder contexts
    ("en", '<a href="tel:{PHONE}">call</a> or write to {EMAIL}'),
    ("en", '{"name": "Test", "phone": "{PHONE}", "ip": "{IPV4}"}'),
    ("en", "Ph. {PHONE} ext. 12 (after 6pm)"),
    ("pt", "Telefone fixo: {PHONE}; e-mail: {EMAIL}."),
    ("es", "Atención al cliente en el {PHONE} (lunes a viernes)."),
    ("zh", "客服热线{PHONE}，工作时间9:00-18:00。"),
    ("en", "curl http://{IPV4}:8080/health returned 503"),
    ("en", "{IPV4},GET,/api/v1/users,200,0.023"),
    ("en", "Peer {IPV6} (port 51413) sent 12 pieces"),
    ("zh", "数据库密码：{PASSWORD_VALUE}，请勿外传。"),
    ("es", "Usuario: admin / contraseña: {PASSWORD_VALUE}"),
    ("pt", "login=suporte&senha={PASSWORD_VALUE}"),
    ("en", "mysql -u root --password={PASSWORD_VALUE} shop"),
    ("en", 'headers = {"Authorization": "Bearer {API_TOKEN_VALUE}"}'),
    ("en", "https://api.example.com/v1/items?api_key={API_TOKEN_VALUE}&page=2"),
    ("en", "  - name: DEPLOY_TOKEN\n    value: {API_TOKEN_VALUE}"),
    ("es", "Pagado con tarjeta {CREDIT_CARD}; el cargo aparecerá como EJEMPLO SA."),
    ("en", "Wallets: BTC {BITCOIN_ADDRESS}, ETH {ETHEREUM_ADDRESS}"),
    ("pt", "Envie o comprovante do PIX para {EMAIL} (CPF {BR_CPF})."),
    ("en", "ssh -i key.pem ubuntu@{IPV4}"),
    # Mixed
    ("en", "Name: Ana Test\nEmail: {EMAIL}\nPhone: {PHONE}\nCard: {CREDIT_CARD}"),
    ("es", "Datos del cliente: {EMAIL}, tel. {PHONE}, DNI {ES_DNI}, IBAN {IBAN}."),
    ("pt", "Cadastro: {EMAIL} | CPF {BR_CPF} | celular {PHONE}"),
    ("zh", "姓名：李雷，电话：{PHONE}，邮箱：{EMAIL}，IP：{IPV4}"),
    ("es", "Proveedor: CUIT {AR_CUIT}; contacto {EMAIL}; cuenta {IBAN}"),
    ("es", "Cliente mexicano: CURP {MX_CURP}, RFC {MX_RFC}, correo {EMAIL}"),
    ("en", "{AWS_ACCESS_KEY} and {GITHUB_TOKEN} were both found in the dump from {IPV4}."),
    ("en", "Login from {IPV6} by {EMAIL} using token {JWT}"),
]

# Hand-written hard negatives: look-alikes that no detector should flag.
NEGATIVES: list[tuple[str, str]] = [
    ("en", "Upgrade to v1.2.3.4 before the next release."),
    ("en", "Windows version 10.0.19041.1 is required."),
    ("en", "Build 4.18.0.240 of the kernel fixes the bug."),
    ("es", "Instale la versión 2.4.1.0 del controlador."),
    ("zh", "请升级到版本 3.2.1.5 以获得修复。"),
    ("en", "The OID 1.3.6.1.4.1.2021.10 maps to the load average."),
    ("en", "Commit 3f786850e387550fdab836ed7e6dc57de6b3f4b1 reverted the change."),
    ("en", "sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"),
    ("en", "Request id 550e8400-e29b-41d4-a716-446655440000 timed out."),
    ("en", "ISBN 978-3-16-148410-0, first edition."),
    ("es", "ISBN: 978-84-376-0494-7"),
    ("en", "Your UPS tracking number is 1Z999AA10123456784."),
    ("en", "Order #123456789012 shipped on 2024-03-15."),
    ("es", "Número de pedido 4021-5567-8890, entregado el 15/03/2024."),
    ("pt", "Pedido nº 2024031500012 confirmado."),
    ("zh", "订单号：202403150001234，请妥善保存。"),
    ("en", "The event started at 2024-03-15T12:30:45Z and ended at 12:45:10."),
    ("en", "Unix time 1700000000 corresponds to November 2023."),
    ("en", "The population grew from 1 234 567 to 1 456 789 between 2010 and 2020."),
    ("es", "El presupuesto es de 700 000 000 € para 2025."),
    ("en", "Coordinates: 40.4168, -3.7038 (Madrid)."),
    ("en", "Loopback 127.0.0.1 and 0.0.0.0 are used for local binds."),
    ("en", "Subnet mask 255.255.255.0, gateway is configured by DHCP."),
    ("en", "The MAC address 00:1A:2B:3C:4D:5E is burned in."),
    ("en", "std::vector<int> v; std::map<a::b, c::d> m;"),
    ("en", "Use the ::1 loopback or localhost for testing."),
    ("en", "Retina asset icon@2x.png and logo@3x.webp are in /static."),
    ("en", "@app.route('/users') decorates the handler; ping @maria on Slack."),
    ("en", "npm install lodash@4.17.21 react@18.2.0"),
    ("en", "Send it to user@localhost for local testing."),
    ("en", 'token = os.environ["GITHUB_TOKEN"]'),
    ("en", 'password = getpass.getpass("Password: ")'),
    ("en", "def login(username: str, password: str) -> bool:"),
    ("en", "api_key = None  # set via env"),
    ("en", "password: ${DB_PASSWORD}"),
    ("en", 'SECRET_KEY = "<your-secret-key>"'),
    ("en", 'token: "xxxxxxxxxxxxxxxx"'),
    ("en", '"password": "********"'),
    ("en", 'max_tokens = 4096\ntoken_type = "bearer"'),
    ("en", 'password_min_length: 12\npassword_hint: "your pet\'s name"'),
    ("en", 'key = "user_id"\nvalue = row[key]'),
    ("en", "The password must contain at least 8 characters."),
    ("en", "Set the API key in settings.api_key before calling."),
    ("en", "export GITHUB_TOKEN=ghp_xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"),
    ("en", "auth_method: oauth\nauth_enabled: true"),
    ("en", "AKIA is the prefix of long-term AWS access key ids."),
    ("en", "The header starts with eyJ because it is base64 of '{\"'."),
    ("en", "Hex color 0xdeadbeef and mask 0xFFFFFFFF."),
    ("en", "tx 0x5c504ed432cb51138bcf09aa5e8a410dd4a1e204ef84bfed1be16dfba1b22060"),
    ("en", "Random number: 1234567890123456."),
    ("en", "Account 0000 0000 0000 0000 is a placeholder."),
    ("en", "Scores: 98 87 91 100 76 85 90 88 94"),
    ("en", "From 1990-2000-2010 the trend was flat."),
    ("en", "Call stack depth 1024, heap 65536, stack 8388608."),
    ("en", "Zip code 94103, PO box 1234."),
    ("es", "Código postal 28013, Madrid. Calle Mayor 12, 3º B."),
    ("pt", "CEP 01310-100, São Paulo."),
    ("zh", "邮编100080，北京市海淀区。"),
    ("en", "The DOI is 10.1000/182 and arXiv:2106.09685."),
    ("en", "Product ASIN B08N5WRWNW, model XPS-9310."),
    ("en", "Temperature readings: 21.5, 22.0, 22.4, 23.1 degrees."),
    ("es", "La reunión es el 15.03.2024 a las 10.30 h."),
    ("en", "Invoice INV-2024-000123 totals $1,234.56."),
    ("en", "+5 points for the team, -3 for fouls, final 2+2=4."),
    ("en", "IBAN format: two letters, two check digits, then up to 30 characters."),
    ("es", "El DNI tiene 8 números y una letra de control."),
    ("pt", "O CPF tem 11 dígitos com dois verificadores."),
    ("zh", "请勿在聊天中分享密码或验证码。"),
    ("en", "Bitcoin addresses start with 1, 3 or bc1; Ethereum ones with 0x."),
    ("en", "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----"),
    ("en", "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUQ\n-----END CERTIFICATE-----"),
    ("en", "See https://example.com/path?query=1 and ftp://files.example.org/pub."),
    (
        "en",
        "The URL scheme is scheme://user:password@host where user and password are placeholders: scheme://<user>:<password>@host",
    ),
    ("en", "ssh git@github.com:acme/repo.git"),
    ("en", "In 2023 we shipped 12 releases, 340 fixes, and 1,200 commits."),
    ("es", "Entre 2019 y 2023 las ventas crecieron un 12,5 %."),
    ("pt", "O jogo terminou 3 a 1, com público de 45.000 pessoas."),
    ("zh", "2023年营收增长了12.5%，员工人数达到3000人。"),
    ("zh", "版本号 v2.10.3.1 修复了若干问题。"),
    ("en", "Lorem ipsum dolor sit amet, consectetur adipiscing elit."),
    ("en", "The quick brown fox jumps over the lazy dog 3 times."),
    ("es", "El rápido zorro marrón salta sobre el perro perezoso."),
    ("pt", "Os dados pessoais devem ser tratados conforme a LGPD."),
    ("zh", "今天天气很好，我们去公园散步吧。"),
    ("en", "Timestamp 20240315123045 in the log file name."),
    ("en", "Serial number SN-8473-2291-0045 on the back label."),
    ("en", "Flight IB 3166 departs at 14:35 from gate 12."),
    ("en", "PI is 3.14159265358979 and e is 2.71828182845904."),
    ("en", "The key: to success is patience."),
    ("en", "Token: 4 of 10 processed; secret: true"),
    ("en", 'def connect(api_key: Optional[str] = None, password: str = ""):'),
    ("en", "self.password = password\nself.api_key = api_key"),
    ("en", "password = hash_password(raw_password)"),
    ("es", "La contraseña debe tener 8 caracteres y un símbolo."),
    ("pt", "Senha: (mínimo 8 caracteres)"),
    ("es", "clave: valor"),
    ("zh", "密码：请联系管理员获取。"),
    ("en", "Call 911 now. ISBN 0-306-40615-2."),
    ("en", "Location lat 37.7749 lon -122.4194, ZIP+4 94103-1234."),
    ("en", "Case No. 2:19-cv-01234, Patent US 9,876,543 B2."),
    ("pt", "Receita de R$ 712.345.678,90 em 2023."),
    ("es", "La población es de 812.345.678 habitantes."),
    ("en", "Logged at 2024/03/15 12:30:45.123 and 15-03-2024."),
    ("en", "Date: Mon, 15 Mar 2024 12:30:45 +0000"),
    ("en", "USPS tracking 9400 1000 0000 0000 0000 00 delivered."),
    ("en", "See section 4.2.1.3 for details, and clause 7.1.2.4."),
    ("en", "Write to name at example dot com, or foo@bar (no domain)."),
    ("en", "AKIAEXAMPLE is too short; AKIA1234567890ABCDEFGHIJ too long."),
    ("en", "-----BEGIN PGP PUBLIC KEY BLOCK-----\nmQENBFzL\n-----END PGP PUBLIC KEY BLOCK-----"),
    ("en", "Never paste a BEGIN PRIVATE KEY block into chat."),
    ("zh", "会议时间：2024年3月15日 14:30，地点：3号楼201室。"),
    ("zh", "产品编号 ABC-2024-000123，批次 20240315。"),
    ("pt", "Nota fiscal nº 000.123.456, série 1."),
    ("es", "Expediente 2024/001234-B, folio 56789."),
    ("en", "Matrix row: 101 202 303 404 505 606 707"),
    ("en", "The range 10.0.0.0/8 is private; so is 192.168.0.0/16."),
    ("en", "Revenue was $612,345,678 and costs 612 345 678 yen... no wait, EUR 712 345 678."),
    ("pt", "Foram vendidas 912.345.678 unidades."),
    ("en", "Memory: 8 589 934 592 bytes total."),
    ("en", "Dial-in code 8812 3456, meeting room 12."),
]


def _mutate_digit(s: str, positions: list[int], r: random.Random) -> str:
    i = r.choice(positions)
    return s[:i] + str((int(s[i]) + r.randint(1, 9)) % 10) + s[i + 1 :]


def negatives_generated(r: random.Random, g) -> list[tuple[str, str]]:
    """Checksum look-alikes: right shape, wrong check digits (`g`: the generator module)."""
    out: list[tuple[str, str]] = []
    ctx = ["Reference {}.", "Número {} no es válido.", "Código {} inválido.", "编号{}无效。"]
    langs = ["en", "es", "pt", "zh"]
    for k in range(8):
        # 16-digit numbers failing Luhn, in card-like groups.
        while True:
            d = "4" + "".join(r.choice("0123456789") for _ in range(15))
            if not _luhn(d):
                break
        out.append((langs[k % 4], ctx[k % 4].format(" ".join(d[i : i + 4] for i in range(0, 16, 4)))))
    for k in range(4):
        ib = g.iban().replace(" ", "")
        ib = _mutate_digit(ib, [i for i, c in enumerate(ib) if c.isdigit() and i >= 4], r)
        out.append((langs[k % 4], f"IBAN {ib} (typo)"))
    for k in range(4):
        dni = g.es_dni().replace("-", "")
        wrong = g.DNI_LETTERS[(g.DNI_LETTERS.index(dni[-1]) + 1) % 23]
        out.append(("es", f"DNI {dni[:-1]}{wrong} con letra errónea"))
    for k in range(4):
        cpf = g.br_cpf()
        out.append(("pt", f"CPF {cpf[:-1]}{(int(cpf[-1]) + 1) % 10} inválido"))
    for k in range(3):
        curp = g.mx_curp()
        out.append(("es", f"CURP {curp[:-1]}{(int(curp[-1]) + 1) % 10} rechazada"))
    for k in range(3):
        rut = g.cl_rut()
        dv = rut[-1]
        out.append(("es", f"RUT {rut[:-1]}{'0' if dv == 'K' else ('K' if dv == '0' else (int(dv) + 1) % 10)} inválido"))
    for k in range(3):
        cuit = g.ar_cuit()
        out.append(("es", f"CUIT {cuit[:-1]}{(int(cuit[-1]) + 1) % 10} no corresponde"))
    for k in range(3):
        out.append(
            ("en", f"SSN {r.choice(['000', '666', '912'])}-{r.randint(10, 99)}-{r.randint(1000, 9999)} is invalid")
        )
    for k in range(4):
        addr = g.bitcoin_address()
        i = len(addr) - 3
        repl = next(c for c in "23456789" if c != addr[i])
        out.append(("en", f"Invalid address {addr[:i]}{repl}{addr[i + 1 :]}"))
    for k in range(4):
        while True:
            addr = g.ethereum_address()
            if addr[2:] != addr[2:].lower():
                break
        i = next(i for i, c in enumerate(addr) if i > 1 and c.isupper())
        out.append(("en", f"Bad checksum {addr[:i]}{addr[i].lower()}{addr[i + 1 :]}"))
    for k in range(3):
        out.append(
            ("en", f"Not a JWT: eyJ{''.join(r.choice('abcdefghijkmnop') for _ in range(20))}.{'x' * 10}.{'y' * 10}")
        )
    return out


def _luhn(d: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(d)):
        v = int(ch) * (2 if i % 2 else 1)
        total += v - 9 if v > 9 else v
    return total % 10 == 0
