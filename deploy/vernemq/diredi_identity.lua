-- DiReDi fleet: who may log in to VerneMQ, for vmq_diversity (see deploy/vernemq/README.md).
--
-- VerneMQ has no use_username_as_clientid: a device could otherwise log in with its own certificate
-- and another device's client id, and take that device's session over. This script refuses every
-- login whose client id is not its username, on every listener:
--   * the devices' listener (DEVICE_LISTENER_PORT, with forward_connection_opts = on so the hook
--     sees the port): the username is the CN of a certificate the TLS handshake verified
--     (use_identity_as_username), so a client id equal to a device id's CN is admitted here;
--   * any other listener (the services', where forward_connection_opts is off, so the hook sees no
--     port): the script only refuses; vmq_passwd, next in that listener's chain, checks the
--     password. (vmq_passwd implements only the hooks without listener metadata: on a listener with
--     forward_connection_opts on it is never asked, and only this script decides.)
-- Keep DEVICE_LISTENER_PORT equal to the port of listener.ssl.devices in vernemq.conf
-- (tests/deploy/test_broker_rules.py checks it).

DEVICE_LISTENER_PORT = 8883

-- A device id (wire/topics.py DEVICE_ID_PATTERN): 3 to 63 of a-z, 0-9 and '-', not starting with '-'.
local function is_device_id(name)
    return type(name) == "string" and #name >= 3 and #name <= 63
        and string.match(name, "^[a-z0-9][a-z0-9%-]*$") ~= nil
end

local function check_identity(reg)
    if reg.username == nil or reg.client_id ~= reg.username then
        return false
    end
    if reg.listener_port == DEVICE_LISTENER_PORT then
        return is_device_id(reg.username)
    end
    return nil -- not this script's decision: the next plugin (vmq_passwd) checks the password
end

hooks = {
    auth_on_register = check_identity,
    auth_on_register_m5 = check_identity,
}
