// A real OpenID Connect provider (panva/oidc-provider) for taskapp's interoperability test.
//
//   node server.mjs [PORT]      (or PORT=... node server.mjs; 0 or nothing = a free port)
//
// Listens on 127.0.0.1 and writes one JSON object per line to stdout:
//   {"event":"ready","issuer":"http://127.0.0.1:PORT","clients":{...},"resources":{...}}
//   {"event":"request","method":"GET","path":"/jwks","status":200}   (every request served)
// Diagnostics (provider warnings, server errors) go to stderr.
//
// Access tokens are JWTs (RFC 9068) issued through the client_credentials grant with a
// resource indicator (RFC 8707). Resource indicators must be absolute URIs, so the API is
// `urn:taskapp:api`, mapped to the audience `taskapp-api` that taskapp expects. Keycloak-like
// claims (`realm_access.roles`, `typ: "Bearer"`) are added with `extraTokenClaims`.

import * as crypto from 'node:crypto';
import * as http from 'node:http';

import Provider, { errors } from 'oidc-provider';

const port = Number(process.argv[2] ?? process.env.PORT ?? 0);
if (!Number.isInteger(port) || port < 0 || port > 65535) {
  console.error(`invalid port ${process.argv[2] ?? process.env.PORT}`);
  process.exit(2);
}

// Resource indicator -> Resource Server (API) definition.
const RESOURCES = {
  // The API under test: RS256-signed JWT access tokens with aud "taskapp-api".
  'urn:taskapp:api': {
    scope: 'tasks',
    audience: 'taskapp-api',
    accessTokenFormat: 'jwt',
    jwt: { sign: { alg: 'RS256' } },
  },
  // Another API of the same provider: valid signature and issuer, wrong audience for taskapp.
  'urn:other:api': {
    scope: 'other',
    audience: 'other-api',
    accessTokenFormat: 'jwt',
    jwt: { sign: { alg: 'RS256' } },
  },
  // An API that gets opaque (reference) access tokens, only usable through introspection.
  'urn:opaque:api': {
    scope: 'opaque',
    audience: 'opaque-api',
    accessTokenFormat: 'opaque',
  },
};

// client_id -> realm roles its tokens carry (Keycloak's service-account roles).
const CLIENTS = {
  'taskapp-worker': { secret: 'worker-secret', roles: ['user'] },
  'reporting-job': { secret: 'reporting-secret', roles: [] },
};

// Fresh keys per run, as JWKs: the provider derives each kid (RFC 7638 thumbprint).
// The EC key is published too, as providers often publish several keys; RS256 tokens are
// signed with the RSA one.
function newJwk(type, options) {
  const { privateKey } = crypto.generateKeyPairSync(type, options);
  return privateKey.export({ format: 'jwk' });
}
const jwks = {
  keys: [
    { ...newJwk('rsa', { modulusLength: 2048 }), use: 'sig', alg: 'RS256' },
    { ...newJwk('ec', { namedCurve: 'P-256' }), use: 'sig', alg: 'ES256' },
  ],
};

// Listen first, so the issuer can name the real port even when the OS picked it.
const server = http.createServer();
await new Promise((resolve, reject) => {
  server.once('error', reject);
  server.listen(port, '127.0.0.1', resolve);
});
const issuer = `http://127.0.0.1:${server.address().port}`;

const provider = new Provider(issuer, {
  jwks,
  clients: Object.entries(CLIENTS).map(([clientId, { secret }]) => ({
    client_id: clientId,
    client_secret: secret,
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    token_endpoint_auth_method: 'client_secret_basic',
  })),
  // Keycloak's default access token lifespan: 5 minutes.
  ttl: { ClientCredentials: 300 },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    introspection: { enabled: true },
    resourceIndicators: {
      enabled: true,
      // Clients name the resource explicitly; none is assumed.
      defaultResource: async () => undefined,
      getResourceServerInfo: async (ctx, resourceIndicator) => {
        const resourceServer = RESOURCES[resourceIndicator];
        if (!resourceServer) throw new errors.InvalidTarget();
        return resourceServer;
      },
    },
  },
  extraTokenClaims: async (ctx, token) => {
    const client = CLIENTS[token.clientId];
    if (!client) return undefined;
    // Not allowed to overwrite the provider's own claims (sub, aud, iss, ...), only to add.
    return {
      typ: 'Bearer',
      azp: token.clientId,
      realm_access: { roles: ['default-roles-taskapp', 'offline_access', ...client.roles] },
    };
  },
});

provider.on('server_error', (ctx, error) => {
  console.error(`server_error ${ctx.method} ${ctx.path}:`, error);
});
provider.on('grant.error', (ctx, error) => {
  console.error(`grant.error ${ctx.method} ${ctx.path}: ${error.message} ${error.error_description ?? ''}`);
});

const callback = provider.callback();
server.on('request', (req, res) => {
  res.on('finish', () => {
    const path = req.url.split('?')[0];
    emit({ event: 'request', method: req.method, path, status: res.statusCode });
  });
  callback(req, res);
});

function emit(record) {
  process.stdout.write(`${JSON.stringify(record)}\n`);
}

function stop() {
  server.close(() => process.exit(0));
  server.closeAllConnections();
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);

emit({
  event: 'ready',
  issuer,
  clients: Object.fromEntries(Object.entries(CLIENTS).map(([id, c]) => [id, c.roles])),
  resources: Object.fromEntries(Object.entries(RESOURCES).map(([id, r]) => [id, r.audience])),
});
