// Real-client suite, Java: pgjdbc (Debian's libpostgresql-jdbc-java) with prepareThreshold=1, so
// every statement is a named server-side prepared statement from its first execution, plus
// getMetaData (a standalone Describe) and a batch. Tenants 1 and 2.
// Usage: java -cp /usr/share/java/postgresql.jar PgjdbcClient.java PORT TOKEN_1 TOKEN_2
import java.sql.*;
import java.util.Properties;

public class PgjdbcClient {
    static void check(boolean cond, String what) {
        if (!cond) throw new AssertionError(what);
    }

    static void scenario(String port, String token, int tenant) throws SQLException {
        Properties p = new Properties();
        p.setProperty("user", "alice");
        p.setProperty("password", token);
        p.setProperty("prepareThreshold", "1");
        try (Connection c = DriverManager.getConnection("jdbc:postgresql://127.0.0.1:" + port + "/app", p)) {
            try (PreparedStatement ps = c.prepareStatement("select count(*), min(tenant_id), max(tenant_id) from orders where tenant_id > ?")) {
                for (int i = 0; i < 10; i++) {
                    ps.setInt(1, 0);
                    try (ResultSet rs = ps.executeQuery()) {
                        rs.next();
                        check(rs.getLong(1) > 0 && rs.getInt(2) == tenant && rs.getInt(3) == tenant, "tenant " + tenant + " saw foreign rows");
                    }
                }
                check(ps.getMetaData().getColumnCount() == 3, "getMetaData");
            }
            c.setAutoCommit(false);
            try (PreparedStatement ins = c.prepareStatement("insert into orders (tenant_id, amount) values (?, ?)")) {
                for (int i = 0; i < 3; i++) {
                    ins.setInt(1, tenant);
                    ins.setInt(2, 8700 + tenant);
                    ins.addBatch();
                }
                check(ins.executeBatch().length == 3, "batch insert");
            }
            c.commit();
            try (PreparedStatement bad = c.prepareStatement("insert into orders (tenant_id, amount) values (?, 1)")) {
                bad.setInt(1, 3 - tenant);
                bad.executeUpdate();
                throw new AssertionError("foreign insert succeeded");
            } catch (SQLException e) {
                check("42501".equals(e.getSQLState()), "foreign insert: " + e.getSQLState());
                c.rollback();
            }
            try (PreparedStatement del = c.prepareStatement("delete from orders where amount = ?")) {
                del.setInt(1, 8700 + tenant);
                check(del.executeUpdate() == 3, "cleanup");
            }
            c.commit();
        }
    }

    public static void main(String[] args) {
        String result = "pass";
        try {
            scenario(args[0], args[1], 1);
            scenario(args[0], args[2], 2);
        } catch (Throwable t) {
            result = "FAIL " + t;
        }
        System.out.println("client pgjdbc (prepareThreshold=1): " + result);
        System.exit(result.equals("pass") ? 0 : 1);
    }
}
